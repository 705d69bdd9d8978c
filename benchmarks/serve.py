"""How fast does `mtgpt serve` answer? Time to first token and tokens/s for 1, 4 and 16 concurrent
streaming clients (the official `openai` client), and the server's tokens/s at one client against
`mtgpt sample`'s own generation loop (`mtgpt.sample.stream`, the code `mtgpt sample` runs) on the
same model, prompt, seed and number of tokens.

    python benchmarks/serve.py                       # the default model shape (6 x 384, context 512)
    python benchmarks/serve.py --run runs/demo --tokens 200 --clients 1 4 16

Without --run, a model of the default shape with random weights is saved to a temporary folder:
speed does not depend on what the weights learned (random weights also never end at
<|endoftext|>, so every request generates all its tokens). The server runs as a subprocess on a
free loopback port; the clients are threads in this process, on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mtgpt import checkpoint
from mtgpt.config import ModelConfig
from mtgpt.model import GPT
from mtgpt.sample import SampleConfig, load_for_inference, stream

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."


def start_server(run: Path, name: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mtgpt", "serve", str(run), "--port", str(port), "--model-name",
                             name, "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    import urllib.request

    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mtgpt serve failed: {proc.stderr.read()}")
            time.sleep(0.2)
    raise SystemExit("mtgpt serve did not start")


def one_client(client, name: str, tokens: int, seed: int, out: list) -> None:
    """One streamed completion through the official `openai` client (client = an OpenAI), or
    through raw HTTP, reading the event lines as they come (client = the URL, a str): the
    lightest client there is, so what is left is the server's own cost."""
    began = time.perf_counter()
    stamps = []
    if isinstance(client, str):
        host, port = client.split("//")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
             "stream": True, "stream_options": {"include_usage": True}}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        n = 0
        for line in r:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
        conn.close()
    else:
        for chunk in client.completions.create(model=name, prompt=PROMPT, max_tokens=tokens, temperature=1.0,
                                               seed=seed, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if chunk.usage:
                n = chunk.usage.completion_tokens
    out.append({"ttft": stamps[0] - began, "total": stamps[-1] - began, "tokens": n,
                "tok_s": (n - 1) / (stamps[-1] - stamps[0])})


def clients(url: str, name: str, count: int, tokens: int, raw: bool = False) -> dict:
    import openai

    client = url if raw else openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    out: list = []
    threads = [threading.Thread(target=one_client, args=(client, name, tokens, i, out)) for i in range(count)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"clients": count, "ttft_median": statistics.median(r["ttft"] for r in out),
            "ttft_max": max(r["ttft"] for r in out), "per_client_tok_s": statistics.median(r["tok_s"] for r in out),
            "total_tok_s": sum(r["tokens"] for r in out) / wall}


def sample_alone(run: Path, tokens: int, seed: int) -> float:
    """Tokens/s of mtgpt sample's generation loop, timed from its first token to its last, as the
    server's per-client rate is."""
    model, tok = load_for_inference(str(run), False, "cpu")  # (the run's own vocabulary: GPT-2's ids overran 512)
    cfg = SampleConfig(max_new_tokens=tokens, temperature=1.0, top_k=200, seed=seed)
    stamps = []
    for nxt, _ in stream(model, tok.encode(PROMPT), cfg):
        int(nxt[0])  # the host sees the token, as `mtgpt sample` does to print it
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run folder (default: random weights of the default shape)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3, help="runs of the one-client comparison (median)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            torch.manual_seed(0)
            model = GPT(ModelConfig())
            run = Path(tmp) / "random"
            checkpoint.save_weights({k: v.detach() for k, v in model.named_parameters()}, model.config, run)
        cfg = checkpoint.load_model_config(checkpoint.model_folder(run))
        print(f"model {cfg.n_layer} x {cfg.n_embd}, context {cfg.block_size}; {args.tokens} tokens per request; "
              f"CPU, torch threads {torch.get_num_threads()}", flush=True)
        proc, url = start_server(run, "bench")
        try:
            clients(url, "bench", 1, 8)  # warm up
            alone, served, raw = [], [], []
            for i in range(args.repeats):  # alternate, so all see the same machine
                alone.append(sample_alone(run, args.tokens, seed=i))
                served.append(clients(url, "bench", 1, args.tokens)["per_client_tok_s"])
                raw.append(clients(url, "bench", 1, args.tokens, raw=True)["per_client_tok_s"])
            a = statistics.median(alone)
            print(f"one client, medians of {args.repeats}: mtgpt sample's loop {a:.1f} tok/s", flush=True)
            for what, runs in (("the openai client", served), ("raw HTTP", raw)):
                s = statistics.median(runs)
                print(f"  mtgpt serve, read by {what}: {s:.1f} tok/s (cost {100 * (1 - s / a):+.1f}%)", flush=True)
            print("| clients | time to first token (median / max) | tokens/s per client (median) | tokens/s, all |")
            print("|---|---|---|---|")
            for n in args.clients:
                r = clients(url, "bench", n, args.tokens)
                print(f"| {n} | {r['ttft_median'] * 1000:.0f} / {r['ttft_max'] * 1000:.0f} ms | "
                      f"{r['per_client_tok_s']:.1f} | {r['total_tok_s']:.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()

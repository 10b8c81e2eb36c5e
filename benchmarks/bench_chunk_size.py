"""Which `logits_chunk_size`: time and peak memory of log pi(a_t|s_t) from hidden states, per chunk size.

    python benchmarks/bench_chunk_size.py                        # Qwen2.5-0.5B's head: H 896, V 151,936
    python benchmarks/bench_chunk_size.py --tokens 512,2048 --chunks 0,64,128,256,512,1024
    python benchmarks/bench_chunk_size.py --quick                # smoke test: H 32, V 1,000
    python benchmarks/bench_chunk_size.py --autograd             # the autograd (checkpoint) backward instead

The output layer alone, as the update runs it: n = B*T hidden states (n, H) with requires_grad, an
fp32 output layer (V, H), log-probs of n random tokens, the backward of their sum into the hidden
states and the layer's weight. Chunk 0 is the full path (one (n, V) logits tensor, as with
`logits_chunk_size: 0`); any other size is `lmpg.chunked_logprobs.chunked_token_logprobs`, the
function the library runs: its written-out backward for a plain nn.Linear, or with --autograd the
path other output layers take (the layer wrapped in nn.Sequential: a checkpoint per chunk). Each chunk size runs in a fresh process: seconds (median of `--repeats`
forward+backward after one warm-up, CPU time beside wall time) and the peak resident memory over the
resident memory before the first forward (VmHWM, reset; MALLOC_MMAP_THRESHOLD_ so that freed tensors
leave the resident set, as in benchmarks/bench_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MMAP_THRESHOLD = 65536


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(chunk: int, n: int, hidden: int, vocab: int, repeats: int, threads: int, autograd: bool) -> dict:
    import torch

    from lmpg.chunked_logprobs import OutputHead, chunked_token_logprobs
    from lmpg.logprobs import selective_log_softmax

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    found = OutputHead(decoder=torch.nn.Identity(), head=torch.nn.Sequential(head) if autograd else head)
    h = torch.randn(1, n, hidden, requires_grad=True)
    tokens = torch.randint(vocab, (1, n))

    def fwd_bwd():
        if chunk == 0:
            logp = selective_log_softmax(head(h), tokens)
        else:
            logp, _ = chunked_token_logprobs(found, h, tokens, chunk_size=chunk)
        logp.sum().backward()
        h.grad = head.weight.grad = None

    base = _rss_mb()
    _reset_peak()
    walls, cpus = [], []
    for _ in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"chunk": chunk, "tokens": n, "hidden": hidden, "vocab": vocab, "threads": threads, "autograd": autograd,
            "s": statistics.median(walls[1:]), "cpu_s": statistics.median(cpus[1:]),
            "peak_over_base_mb": _peak_mb() - base, "load": os.getloadavg()[0]}


def run(chunk, n, hidden, vocab, repeats, threads, autograd=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(chunk), "--tokens", str(n),
           "--hidden", str(hidden), "--vocab", str(vocab), "--repeats", str(repeats), "--threads", str(threads)]
    cmd += ["--autograd"] if autograd else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| tokens | chunk | s fwd+bwd | CPU s | peak over base MB | time / full | peak / full |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    full = {r["tokens"]: r for r in rows if r["chunk"] == 0}
    for r in rows:
        f = full.get(r["tokens"])
        rel = f"{r['s'] / f['s']:.2f} | {r['peak_over_base_mb'] / f['peak_over_base_mb']:.2f}" if f else "- | -"
        name = "full" if r["chunk"] == 0 else f"{r['chunk']}{' autograd' if r.get('autograd') else ''}"
        lines.append(f"| {r['tokens']} | {name} | {r['s']:.3f} | {r['cpu_s']:.3f} | {r['peak_over_base_mb']:.0f} | {rel} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048", help="B*T values, comma-separated")
    ap.add_argument("--chunks", default="0,64,128,256,512,1024", help="chunk sizes; 0 = full logits")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autograd", action="store_true", help="chunks through autograd checkpoints")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, int(a.tokens), a.hidden, a.vocab, a.repeats, a.threads, a.autograd)))
        return []
    if a.quick:
        a.tokens, a.chunks, a.hidden, a.vocab, a.repeats = "64", "0,16", 32, 1000, 1
    rows = []
    for n in (int(t) for t in a.tokens.split(",")):
        for chunk in (int(c) for c in a.chunks.split(",")):
            rows.append(run(chunk, n, a.hidden, a.vocab, a.repeats, a.threads, a.autograd and chunk > 0))
            print(f"  tokens {n} chunk {chunk}: {rows[-1]['s']:.3f} s, +{rows[-1]['peak_over_base_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

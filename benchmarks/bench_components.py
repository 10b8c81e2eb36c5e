"""CPU seconds of the pieces behind lmpg's speed-ups, each alone, at an iteration's shapes.

    python benchmarks/bench_components.py --size W2,W1        # median CPU seconds of each piece
    python benchmarks/bench_components.py --quick             # smoke test: the quick model, 1 repeat
    python benchmarks/bench_components.py --json out.json     # also write the figures

The evidence for gains too small to resolve in whole iterations on a shared machine
(benchmarks/bench_iteration.py). Each piece runs as the library runs it, beside the plain way it
replaces, through public calls only, on `--size`'s model (benchmarks/workload.py) and an iteration's
shapes (B = 32 rows of 8 prompts, T = 32):

1. one AdamW step over the model's parameters: torch's default (a for-each loop on CPU) vs fused
   (what `lmpg.optim.make_adamw` builds);
2. `lmpg.diagnostics.GradientMoments` on one micro-batch, as grad_snr runs it;
3. the log-softmax of the taken tokens, forward and backward on (B, T, V) logits for B = 32, 64, 128:
   the definition (log_softmax over V, then gather) vs `lmpg.logprobs.selective_log_softmax`;
4. the training forward and backward of 8 prompts x G=4 completions: one forward per row
   (`completion_logits`) vs the shared-prompt forward (`shared_prompt_completion_logits`);
5. the whole sampling of those 32 completions (`lmpg.sampler.sample_tokens`, each distinct prompt
   prefilled once).

The library's earlier versions of these pieces (the sliced log-softmax, the row-by-row prefill)
could only be timed by patching them in; their figures are kept in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# workload sets the environment the measurements assume (OMP_WAIT_POLICY=PASSIVE, ...) before torch loads
from workload import NUM_THREADS, SIZES, make_model, make_prompts  # noqa: E402

import torch  # noqa: E402


def cpu_median(fn, repeats: int) -> float:
    """Median CPU seconds of fn() over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def run_components(size: str = "W2", repeats: int = 7, threads: int = NUM_THREADS) -> dict:
    """The median CPU seconds of each piece on `size`'s model, keyed by piece."""
    from lmpg.diagnostics import GradientMoments
    from lmpg.logprobs import completion_logits, selective_log_softmax, shared_prompt_completion_logits
    from lmpg.rollout import sample_completions
    from lmpg.sampler import sample_tokens
    from lmpg.tiny import make_word_tokenizer

    torch.set_num_threads(threads)
    shape = SIZES[size]
    tok = make_word_tokenizer(shape.vocab_size)
    model = make_model(tok, shape)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"size": size, "threads": threads, "repeats": repeats}

    # 1. one AdamW step: for-each (torch's CPU default) vs fused (lmpg.optim.make_adamw)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, kw in (("adamw_step_s", {}), ("adamw_fused_step_s", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-9, **kw)
        out[name] = cpu_median(opt.step, repeats)

    # 2. GradientMoments on one micro-batch, as the update runs it: gradients unset before the
    # backward, set after it
    grads = [p.grad for p in params]

    def moments():
        m = GradientMoments(params)
        for p in params:
            p.grad = None
        m.before_backward()
        for p, g in zip(params, grads):
            p.grad = g
        m.after_backward(scale=1.0)
        m.result()
    out["grad_snr_moments_s"] = cpu_median(moments, repeats)

    # 3. log pi of the taken tokens, forward + backward on (B, T, V) logits: definition vs lmpg's
    def definition(z, tokens):
        return torch.log_softmax(z.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    V = shape.vocab_size
    for B in (32, 64, 128):
        logits = torch.randn(B, 32, V)
        tokens = torch.randint(0, V, (B, 32))
        for name, fn in (("definition", definition), ("split", selective_log_softmax)):
            def fwd_bwd(fn=fn):
                z = logits.clone().requires_grad_()
                fn(z, tokens).sum().backward()
            out[f"log_softmax_{name}_B{B}_s"] = cpu_median(fwd_bwd, repeats)

    # 4. a rollout of 8 prompts x 4 samples, then the training forward + backward: plain vs shared prompt
    roll = sample_completions(model, tok, make_prompts()[:8], 4, max_new_tokens=32, seeds=list(range(32)))
    group = torch.as_tensor(roll.prompt_index)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    for name, logits_fn in (("plain", lambda: completion_logits(model, *args)),
                            ("shared_prompt", lambda: shared_prompt_completion_logits(model, *args, group))):
        def fwd_bwd(logits_fn=logits_fn):
            selective_log_softmax(logits_fn(), roll.completion_ids).sum().backward()
            model.zero_grad(set_to_none=True)
        out[f"train_fwd_bwd_{name}_s"] = cpu_median(fwd_bwd, max(repeats // 2, 3))

    # 5. the sampler: 32 completions of 32 tokens, each distinct prompt prefilled once
    def sample():
        sample_tokens(model, roll.prompt_ids, roll.prompt_mask, list(range(32)), max_new_tokens=32,
                      eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    out["sample_shared_prefill_s"] = cpu_median(sample, max(repeats // 2, 3))
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="W2,W1", help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per piece (median), after one untimed")
    ap.add_argument("--threads", type=int, default=NUM_THREADS, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="smoke test: the quick model, 1 repeat")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeats = "quick", 1
    sizes = args.size.split(",")
    for name in sizes:
        if name not in SIZES:
            ap.error(f"unknown --size {name}; choose from {', '.join(SIZES)}")
    results = [run_components(size, args.repeats, args.threads) for size in sizes]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

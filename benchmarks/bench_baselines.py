"""group_mean vs optimal (and optimal_token) baselines: gradient SNR and reward curve, same seeds; and
the exact gradient variance of optimal vs leave_one_out where the weights differ strongly and where not.

    python benchmarks/bench_baselines.py                         # 3 seeds, both training tasks
    python benchmarks/bench_baselines.py --seeds 0,1,2,3 --baselines group_mean,optimal,optimal_token
    python benchmarks/bench_baselines.py --tasks variance        # exact variances, about 20 s on one core

Two training tasks, each run once per (seed, baseline), the baselines interleaved seed by seed so that
they share the machine's conditions:

1. addition: the default recipe (recipes/addition_cpu.py) in its --fast form (2-digit sums, a warm
   start by imitation, then 40 RL iterations of 128 completions, G = 8), with micro_batch_size=32 so
   the first epoch has 4 micro-batch gradients to estimate the SNR from;
2. count_a: the tiny model of the tests from scratch (1 layer, 32 wide), reward = share of 'a'
   among 8 characters, completions of up to 8 tokens (lengths vary: EOS can come at any step),
   30 iterations of 32 completions, G = 8, micro_batch_size=8.

Per run: the mean over iterations of grad_snr (lmpg.diagnostics: ||g_bar||^2 / (tr Sigma / J) from
the J micro-batch gradients; higher is better) and of grad_sq_norm_cv (how unequal the weights are),
the reward of the first and the last 5 iterations, and for addition the held-out accuracy of the RL
policy. Printed as a table and written to --out (JSON).

3. variance (no training; --seeds and --baselines do not apply): the exact total variance
   E||g_hat - grad J||^2 of the G-sample estimator g_hat = (1/G) sum_i g(tau_i) (R_i - b_i),
   g = grad_theta log p(tau), the quantity the optimal baseline minimises, on policies whose
   completions can all be listed. Nothing is sampled: each expectation is a finite sum over the
   multisets of the other samples of the group (`exact_group_variance`). Baselines: `optimal` (lmpg's
   leave-one-out b_i = sum_{j != i} w_j R_j / sum_{j != i} w_j with lmpg's weight w, the logit-gradient
   proxy), `leave_one_out` (RLOO: the same with w = 1), and two oracle constants no trainer has, b* =
   E[||g||^2 R] / E[||g||^2] and E[R]. Policies: tabular softmax policies (one free logit row per
   prefix, logits seeded; there the proxy is ||g||^2 exactly) whose weights are nearly equal, or apart
   by length (EOS at any step) or by peakedness (large logits; EOS likely or unlikely); and the tests'
   tiny LM (lmpg.tiny, 1 layer, 16 wide, seed 0; 5 tokens, completions of up to 2) at temperatures 1
   and 0.05, where the proxy drops the Jacobians, so `optimal` is also run with the exact ||g||^2
   (autograd, one backward per completion) as its weight. Rewards: unrelated to the weights (uniform in
   [0, 1), seeded), rising with them (R = ||g||^2 / max ||g||^2), and 1 on the most likely completion.
   Checked before use: the formula reproduces tests/test_estimator_enumeration.py's brute-force
   variances (SKEWED, G = 2, 4, 8), and its baselines equal lmpg.advantages.baseline's on random groups.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

import datasets  # noqa: E402
import torch  # noqa: E402

from lmpg import PGConfig, PGTrainer  # noqa: E402
from lmpg.advantages import baseline as lmpg_baseline  # noqa: E402
from lmpg.logprobs import logit_grad_sq_norm  # noqa: E402
from lmpg.metrics import read_jsonl  # noqa: E402
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm  # noqa: E402


def count_a(prompts, completions, **kwargs):
    """Share of 'a' characters among 8 (the tests' reward)."""
    return [c.count("a") / 8 for c in completions]


def run_addition(seed: int, baseline: str, out: Path) -> dict:
    import addition_cpu

    result = addition_cpu.main(["--fast", f"seed={seed}", f"baseline={baseline}", "grad_snr=true",
                                "micro_batch_size=32", "log_every=1000", "--output-dir", str(out)])
    return {"metrics": read_jsonl(out / "metrics.jsonl"), "heldout": result["accuracy"]["rl_policy"],
            "warm_start": result["accuracy"]["warm_start"]}


def run_count_a(seed: int, baseline: str, out: Path) -> dict:
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=seed)
    prompts = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(48)])
    config = PGConfig(output_dir=str(out), seed=seed, iterations=30, batch_size=32, group_size=8,
                      max_new_tokens=8, learning_rate=3e-3, micro_batch_size=8, baseline=baseline,
                      grad_snr=True, sample_log_every=0, log_every=1000, progress_bar=False)
    PGTrainer(model, [count_a], prompts, config, tokenizer=tokenizer).train()
    return {"metrics": read_jsonl(out / "metrics.jsonl")}


TASKS = {"addition": run_addition, "count_a": run_count_a}


# ---------------------------------------------------------------------------------------------
# 3. variance: the exact gradient variance of each baseline on policies with finitely many completions
# ---------------------------------------------------------------------------------------------

DT = torch.float64
VARIANCE_GROUP_SIZES = (4, 8)
THETA_SEED, REWARD_SEED = 1, 5


@dataclass
class EnumeratedPolicy:
    """What the variance needs from a policy whose C completions can all be listed."""

    name: str
    pi: torch.Tensor  # (C,) probability of each completion
    gram: torch.Tensor  # (C, C) g(tau_c) . g(tau_d), g = grad_theta log p(tau)
    proxy: torch.Tensor  # (C,) lmpg's weight: logit_grad_sq_norm summed over the completion's tokens

    @property
    def exact_sq_norm(self) -> torch.Tensor:
        return self.gram.diagonal()


def list_completions(V: int, L: int, eos: bool) -> list[tuple[int, ...]]:
    """Every completion over tokens 0..V-1 that stops at EOS (token V-1, when eos) or after L tokens."""
    out = []

    def extend(prefix):
        for token in range(V):
            seq = prefix + (token,)
            if (eos and token == V - 1) or len(seq) == L:
                out.append(seq)
            else:
                extend(seq)

    extend(())
    return out


def tabular_policy(name: str, V: int, L: int, *, eos: bool, scale: float, eos_logit: float = 0.0,
                   seed: int = THETA_SEED) -> EnumeratedPolicy:
    """pi(a | prefix) = softmax(theta[prefix]), one free logit row per prefix (the tests' TabularPolicy):
    theta = scale * N(0, 1) (seeded), plus eos_logit on EOS. grad_theta log pi(a | s) = e_a - pi(s)
    on row s, so g(tau) is written down, not differentiated."""
    completions = list_completions(V, L, eos)
    prefixes = sorted({c[:t] for c in completions for t in range(len(c))}, key=lambda p: (len(p), p))
    row = {prefix: i for i, prefix in enumerate(prefixes)}
    theta = scale * torch.randn(len(prefixes), V, generator=torch.Generator().manual_seed(seed), dtype=DT)
    if eos:
        theta[:, V - 1] += eos_logit
    logp_all = torch.log_softmax(theta, -1)  # (S, V)
    C = len(completions)
    grads = torch.zeros(C, len(prefixes), V, dtype=DT)
    logp, proxy = torch.zeros(C, dtype=DT), torch.zeros(C, dtype=DT)
    for c, completion in enumerate(completions):
        states = torch.tensor([row[completion[:t]] for t in range(len(completion))])
        tokens = torch.tensor(completion)
        logp[c] = logp_all[states, tokens].sum()
        proxy[c] = logit_grad_sq_norm(logp_all[states], tokens).sum()
        grads[c].index_add_(0, states, torch.nn.functional.one_hot(tokens, V).to(DT) - logp_all[states].exp())
    grads = grads.view(C, -1)
    return EnumeratedPolicy(name, logp.exp(), grads @ grads.T, proxy)


def tiny_lm_policy(name: str, temperature: float, L: int = 2) -> EnumeratedPolicy:
    """lmpg.tiny's LM (1 layer, 16 wide, seed 0) after the prompt '<bos>a', sampling at `temperature`
    over its 5 tokens (EOS ends a completion): g(tau) by autograd through every parameter."""
    tokenizer = make_char_tokenizer("a")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=0).to(DT)
    V, eos_id = len(tokenizer), tokenizer.eos_token_id
    order = [t for t in range(V) if t != eos_id] + [eos_id]  # list_completions takes the last token as EOS
    prompt = [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("a")]
    params = [p for p in model.parameters() if p.requires_grad]
    rows, logps, proxies = [], [], []
    for completion in list_completions(V, L, eos=True):
        tokens = torch.tensor([order[i] for i in completion])
        ids = torch.tensor([prompt + tokens.tolist()[:-1]])
        logits = model(ids).logits[0, len(prompt) - 1:] / temperature  # (T, V) at each action
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)]))
        logps.append(float(logp.detach()))
        proxies.append(float(logit_grad_sq_norm(logp_all.detach(), tokens, temperature).sum()))
    grads = torch.stack(rows)
    return EnumeratedPolicy(name, torch.tensor(logps, dtype=DT).exp(), grads @ grads.T,
                            torch.tensor(proxies, dtype=DT))


def multisets(pi: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every multiset of n completions drawn i.i.d. from pi, as counts (M, C), and its probability (M,):
    n! / prod_c k_c! * prod_c pi_c^k_c."""
    C = pi.shape[0]
    members = list(itertools.combinations_with_replacement(range(C), n))
    index = torch.tensor(members, dtype=torch.long).view(len(members), n)
    counts = torch.zeros(len(members), C, dtype=DT).scatter_add_(1, index, torch.ones(index.shape, dtype=DT))
    log_prob = math.lgamma(n + 1) - torch.lgamma(counts + 1).sum(1) + counts @ pi.log()
    return counts, log_prob.exp()


def exact_group_variance(pi, R, w, gram, G, rest_of_pair, rest_of_one) -> float:
    """E||g_hat - grad J||^2 for g_hat = (1/G) sum_i g(tau_i) a_i, a_i = R_i - b_i with the
    leave-one-out weighted baseline b_i = sum_{j != i} w_j R_j / sum_{j != i} w_j (w = 1: RLOO),
    G completions i.i.d. from pi. The baseline leaves g_hat unbiased, so the variance is
    E||g_hat||^2 - ||grad J||^2, and by exchangeability

        E||g_hat||^2 = (1/G) E[a_1^2 ||g_1||^2] + ((G-1)/G) E[a_1 a_2 g_1 . g_2]

    where b_1 depends on the G-1 others (`rest_of_one`: multisets of G-1) and, in the pair term, b_1
    on tau_2 and the G-2 others, b_2 on tau_1 and the same G-2 (`rest_of_pair`: multisets of G-2).
    Needs every w > 0 (lmpg's fallback for a zero weight sum, the plain mean, is not modelled)."""
    if not bool((w > 0).all()):
        raise SystemExit("exact_group_variance needs positive weights")
    pi_R = pi * R
    grad_J_sq = pi_R @ gram @ pi_R
    sq_norm = gram.diagonal()
    counts, prob = rest_of_one
    b = (counts @ (w * R)) / (counts @ w)  # (M,) the baseline of sample 1 given the others
    single = (pi @ (sq_norm * R**2) - 2 * (prob @ b) * (pi @ (sq_norm * R)) + (prob @ b**2) * (pi @ sq_norm))
    counts, prob = rest_of_pair
    weighted_sum, weight_sum = counts @ (w * R), counts @ w  # (M,) over the G-2 others
    # B[m, c]: a sample's baseline when the other of the pair is completion c: a_1 = R_c1 - B[m, c2]
    B = (weighted_sum[:, None] + w * R) / (weight_sum[:, None] + w)
    P = pi[:, None] * pi[None, :] * gram  # (C, C) pi_c pi_d g_c . g_d
    # sum_cd P_cd (R_c - B_d)(R_d - B_c) = R'PR - 2 sum_c R_c B_c (P 1)_c + B'PB, P symmetric
    per_rest = R @ P @ R - 2 * (B * (R * P.sum(1))).sum(1) + ((B @ P) * B).sum(1)
    pair = prob @ per_rest
    return float(single / G + (G - 1) / G * pair - grad_J_sq)


def constant_baseline_variance(pi, R, gram, G, b: float) -> float:
    """The same for a constant b: the G terms are i.i.d., (1/G)(E[(R-b)^2 ||g||^2] - ||grad J||^2)."""
    pi_R = pi * R
    return float(((pi * (R - b) ** 2) @ gram.diagonal() - pi_R @ gram @ pi_R) / G)


def check_against_enumeration_test() -> None:
    """tests/test_estimator_enumeration.py's SKEWED case (V=2, L=3, theta seed 0, R = w / max w),
    whose variances that test gets by listing every batch of G through lmpg's own baseline."""
    policy = tabular_policy("skewed", 2, 3, eos=True, scale=1.0, seed=0)
    R = policy.proxy / policy.proxy.max()
    expected = {2: (0.071819, 0.071819), 4: (0.028673, 0.029511), 8: (0.008708, 0.013842)}
    for G, (optimal, rloo) in expected.items():
        rests = multisets(policy.pi, G - 2), multisets(policy.pi, G - 1)
        got = (exact_group_variance(policy.pi, R, policy.proxy, policy.gram, G, *rests),
               exact_group_variance(policy.pi, R, torch.ones_like(R), policy.gram, G, *rests))
        if max(abs(a - b) for a, b in zip(got, (optimal, rloo))) > 2e-6:
            raise SystemExit(f"exact variance {got} at G={G} differs from the enumeration test's {(optimal, rloo)}")


def check_against_lmpg_baseline(policy: EnumeratedPolicy, R: torch.Tensor, G: int, w: torch.Tensor) -> None:
    """The baselines of exact_group_variance are lmpg's: 64 random groups through lmpg.advantages.baseline."""
    index = torch.multinomial(policy.pi, 64 * G, replacement=True, generator=torch.Generator().manual_seed(0))
    ret, weight = R[index], w[index]
    for kind, wj in (("optimal", weight), ("leave_one_out", torch.ones_like(weight))):
        lmpg_b = lmpg_baseline(ret, G, kind, weight=weight if kind == "optimal" else None).view(-1, G)
        wr, ws = (wj * ret).view(-1, G), wj.view(-1, G)
        ours = (wr.sum(1, keepdim=True) - wr) / (ws.sum(1, keepdim=True) - ws)
        if not torch.allclose(lmpg_b, ours, rtol=1e-9, atol=1e-12):
            raise SystemExit(f"{kind} baseline of {policy.name} differs from lmpg.advantages.baseline")


def variance_policies() -> list[EnumeratedPolicy]:
    return [
        tabular_policy("flat, fixed length (3 tokens, 2 steps)", 3, 2, eos=False, scale=0.3),
        tabular_policy("long vs short (EOS p~0.5, up to 8)", 2, 8, eos=True, scale=0.3),
        tabular_policy("peaked, runs long (EOS p~0.05, up to 8)", 2, 8, eos=True, scale=0.3, eos_logit=-3.0),
        tabular_policy("peaked, stops at once (EOS p~0.95, up to 8)", 2, 8, eos=True, scale=0.3, eos_logit=3.0),
        tabular_policy("peaked tokens, fixed length (2 tokens, 4 steps)", 2, 4, eos=False, scale=3.0),
        tiny_lm_policy("tiny LM, temperature 1", 1.0),
        tiny_lm_policy("tiny LM, temperature 0.05", 0.05),
    ]


def variance_rewards(policy: EnumeratedPolicy) -> dict[str, torch.Tensor]:
    C = policy.pi.shape[0]
    w = policy.exact_sq_norm
    return {
        "unrelated (uniform)": torch.rand(C, generator=torch.Generator().manual_seed(REWARD_SEED), dtype=DT),
        "rises with ‖g‖² (‖g‖² / max)": w / w.max(),
        "1 on the mode": (torch.arange(C) == int(policy.pi.argmax())).to(DT),
    }


def run_variance() -> list[dict]:
    check_against_enumeration_test()
    rows = []
    for policy in variance_policies():
        pi, gram, w = policy.pi, policy.gram, policy.exact_sq_norm
        mean_w = pi @ w
        weight_cv = float((pi @ (w - mean_w) ** 2).sqrt() / mean_w)
        proxy_is_exact = bool(torch.allclose(policy.proxy, w, rtol=1e-9))
        rests = {G: (multisets(pi, G - 2), multisets(pi, G - 1)) for G in VARIANCE_GROUP_SIZES}
        for reward, R in variance_rewards(policy).items():
            b_star, mean_R = float((pi @ (w * R)) / mean_w), float(pi @ R)
            for G in VARIANCE_GROUP_SIZES:
                check_against_lmpg_baseline(policy, R, G, policy.proxy)
                row = {"policy": policy.name, "completions": len(pi), "weight_spread": float(w.max() / w.min()),
                       "proxy_spread": float(policy.proxy.max() / policy.proxy.min()),
                       "weight_cv": weight_cv, "proxy_is_exact": proxy_is_exact, "reward": reward,
                       "b_star": b_star, "mean_R": mean_R, "G": G,
                       "var_b_star": constant_baseline_variance(pi, R, gram, G, b_star),
                       "var_mean_R": constant_baseline_variance(pi, R, gram, G, mean_R),
                       "var_optimal": exact_group_variance(pi, R, policy.proxy, gram, G, *rests[G]),
                       "var_leave_one_out": exact_group_variance(pi, R, torch.ones_like(R), gram, G, *rests[G])}
                if not proxy_is_exact:
                    row["var_optimal_exact_w"] = exact_group_variance(pi, R, w, gram, G, *rests[G])
                rows.append(row)
    return rows


def print_variance_table(rows: list[dict]) -> None:
    """One row per (policy, reward, G): the exact total variances and optimal's ratio to leave_one_out
    (above 1: optimal is worse; for the LM, in brackets, the ratio with the exact ||g||^2 as weight)."""
    print("\n| policy | ‖g‖² max/min (cv) | reward | b* / E[R] | G | b* oracle | E[R] oracle | optimal "
          "| leave_one_out | optimal / leave_one_out |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["var_optimal"] / r["var_leave_one_out"]
        spread = f"{r['weight_spread']:.3g}x ({r['weight_cv']:.2f})"
        if not r["proxy_is_exact"]:
            spread += f"; proxy {r['proxy_spread']:.3g}x"
        exact_w = (f" (exact w: {r['var_optimal_exact_w'] / r['var_leave_one_out']:.3f})"
                   if "var_optimal_exact_w" in r else "")
        print(f"| {r['policy']} | {spread} | {r['reward']} | {r['b_star']:.3f} / {r['mean_R']:.3f} | {r['G']} "
              f"| {r['var_b_star']:.4g} | {r['var_mean_R']:.4g} | {r['var_optimal']:.4g} "
              f"| {r['var_leave_one_out']:.4g} | {ratio:.3f}{' **worse**' if ratio > 1 else ''}{exact_w} |")


def summarise(run: dict) -> dict:
    m = run["metrics"]
    snr = [r["grad_snr"] for r in m if r.get("grad_snr") is not None]
    cv = [r["grad_sq_norm_cv"] for r in m if "grad_sq_norm_cv" in r]
    row = {"grad_snr_mean": statistics.fmean(snr) if snr else float("nan"),
           "grad_snr_median": statistics.median(snr) if snr else float("nan"),
           "reward_first": m[0]["reward_mean"],
           "reward_last5": statistics.fmean(r["reward_mean"] for r in m[-5:]),
           "reward_curve": [round(r["reward_mean"], 4) for r in m],
           "weight_cv_mean": statistics.fmean(cv) if cv else None}
    if "heldout" in run:
        row["heldout_greedy"] = run["heldout"]["greedy"]
        row["heldout_sampled"] = run["heldout"]["sampled"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--baselines", default="group_mean,optimal")
    parser.add_argument("--tasks", default="addition,count_a")
    parser.add_argument("--out", default="bench_baselines.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    baselines = args.baselines.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            if task == "variance":
                t0 = time.perf_counter()
                results["variance"] = run_variance()
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
                print_variance_table(results["variance"])
                print(f"\nvariance: {time.perf_counter() - t0:.0f} s", flush=True)
                continue
            for seed in seeds:
                for baseline in baselines:  # interleaved: the baselines of one seed run back to back
                    t0 = time.perf_counter()
                    run = TASKS[task](seed, baseline, Path(tmp) / f"{task}_{baseline}_{seed}")
                    row = summarise(run) | {"seconds": time.perf_counter() - t0}
                    results.setdefault(task, {}).setdefault(baseline, {})[seed] = row
                    print(f"{task} seed {seed} {baseline}: snr {row['grad_snr_mean']:.3f} reward "
                          f"{row['reward_first']:.3f} -> {row['reward_last5']:.3f} ({row['seconds']:.0f} s)", flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    training = {task: by_baseline for task, by_baseline in results.items() if task != "variance"}
    if not training:
        return
    print("\n| task | baseline | grad_snr (mean over iterations; per seed) | reward first -> last 5 (per seed) | held-out greedy |")
    print("| --- | --- | --- | --- | --- |")
    for task, by_baseline in training.items():
        for baseline, by_seed in by_baseline.items():
            rows = list(by_seed.values())
            snr = " / ".join(f"{r['grad_snr_mean']:.2f}" for r in rows)
            rew = " / ".join(f"{r['reward_first']:.3f}->{r['reward_last5']:.3f}" for r in rows)
            acc = " / ".join(f"{r['heldout_greedy']:.3f}" for r in rows) if "heldout_greedy" in rows[0] else "-"
            print(f"| {task} | {baseline} | {statistics.fmean(r['grad_snr_mean'] for r in rows):.2f} ({snr}) | "
                  f"{rew} | {acc} |")


if __name__ == "__main__":
    main()

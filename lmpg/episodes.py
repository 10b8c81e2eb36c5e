"""Multi-turn episodes: the lecture's MDP with dynamics, sampled token-in, token-out.

A single-turn completion is an MDP whose dynamics are trivial (the next state is the previous one
with the action appended). In an episode the world answers: after each turn of the policy the
environment writes an observation (a tool's result, a game's feedback, a simulated user's reply),
and the policy's next turn conditions on it. With s_0 the prompt, the trajectory is

    tau = (s_0, a_1 ... a_k, o_1 ... o_m, a_{k+1} ...),
    p_theta(tau) = prod_{action tokens t} pi_theta(a_t | s_t) * prod_{environment tokens} P(o | s),

so

    grad log p_theta(tau) = sum over the policy's own tokens only of grad log pi_theta(a_t | s_t):

the environment's tokens are dynamics, independent of theta, and carry no log-prob term; they are
part of the state every later action conditions on (they stay in the forward pass, out of the
loss). `TrajectoryBatch.action_mask` says which tokens are actions; it has holes where the
environment wrote. Putting the environment's tokens in the loss adds E[grad log pi_theta(o|s) A],
which is not zero because o is drawn from P, not from pi_theta: a bias no batch size removes
(0.62 of |grad J| in tests/test_episodes_enumeration.py).

Rewards may arrive after any turn. Each sits on the last token of its turn, and reward-to-go
credits a token with the rewards of its own turn and the later ones, discounted per turn:

    ret_t = sum_{k >= turn(t)} gamma^(k - turn(t)) R_k          (`lmpg.advantages`, turn_ids)

(the whole return R = sum_k gamma^k R_k without reward-to-go). The G episodes of a group start from
the same initial state (same prompt, same environment seed), so the group baselines compare
episodes of one initial state, as in the single-turn case.

Token-in, token-out. The policy's sampled tokens are kept exactly as sampled; the environment's
text is tokenized on its own and appended, wrapped in the chat template's bridge tokens (derived
once by rendering, `ChatBridge`), so the history is never re-tokenised: decode-then-encode is not
the identity for BPE tokenizers, and a re-tokenised history would train on tokens the policy never
sampled (tests/test_episodes.py shows the log-probs move).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmpg.batch import TrajectoryBatch
from lmpg.data import is_conversational
from lmpg.environments import EpisodeEnv
from lmpg.errors import ConfigError, DataError
from lmpg.kvcache import cache_kwarg, returned_cache
from lmpg.rollout import encode_prompts
from lmpg.sampler import filter_logits, gumbel_noise


@dataclass
class EpisodeLimits:
    """Limits that end an episode early; an episode that hits one is truncated, never finished."""

    max_turns: int = 4
    """Policy turns per episode."""
    max_new_tokens: int = 64
    """Tokens per policy turn (a turn that reaches it without EOS truncates the episode)."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt, the policy's and the environment's (default: max_turns * max_new_tokens * 2)."""

    @property
    def episode_tokens(self) -> int:
        return self.max_episode_tokens or 2 * self.max_turns * self.max_new_tokens


@dataclass
class Episode:
    """One episode as it happened: the turns, what the environment said, and the counts."""

    messages: list = field(default_factory=list)
    """[{"role": "assistant" | "tool" | "user", "content": ...}, ...] after the prompt, turn by turn."""
    rewards: list = field(default_factory=list)
    """(position after the prompt, reward) of each reward the environment gave."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    env_seconds: float = 0.0
    environment: object = None
    """The environment instance, for reward functions that read its state (TRL's `environments`)."""


class ChatBridge:
    """The tokens a chat template puts around an environment message between two policy turns.

    Derived once by rendering [user, assistant] and [user, assistant, message] with the generation
    prompt, and cutting the first off the second after the assistant's end-of-turn token (the EOS
    the policy samples itself): what remains is head + content + tail, checked with two different
    contents and with the template not rewriting the earlier turns. `ids(content)` is then
    head_ids + encode(content) + tail_ids: the environment's text tokenized on its own, the history
    never re-tokenised. With no chat template (plain-text prompts) head and tail are empty.
    """

    def __init__(self, tokenizer, role: str, tools: list | None = None):
        self.tokenizer = tokenizer
        head = tail = ""
        if getattr(tokenizer, "chat_template", None):
            head, tail = self._derive(role, tools)
        self.head_ids = tokenizer.encode(head, add_special_tokens=False) if head else []
        self.tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []

    def _derive(self, role, tools):
        tok = self.tokenizer

        def render(messages, generation):
            return tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=generation)

        turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        base = render(turns, False)
        eos = tok.eos_token or ""
        if eos and eos in base:
            base = base[:base.rindex(eos) + len(eos)]  # the policy's own EOS ends its turn
        pieces = []
        for content in ("XYZZY", "PLUGH"):
            full = render(turns + [{"role": role, "content": content}], True)
            if not full.startswith(base) or content not in full[len(base):]:
                raise ConfigError(f"the chat template rewrites earlier turns when a {role} message follows "
                                  "(token-in/token-out needs a prefix-preserving template); use another template")
            head, _, tail = full[len(base):].partition(content)
            pieces.append((head, tail))
        if pieces[0] != pieces[1]:
            raise ConfigError(f"the chat template wraps {role} messages differently for different contents")
        return pieces[0]

    def ids(self, content: str) -> list[int]:
        body = self.tokenizer.encode(content, add_special_tokens=False) if content else []
        return self.head_ids + body + self.tail_ids


def render_episode_prompt(tokenizer, prompt, first_observation: str | None, tools: list | None) -> tuple[str, bool]:
    """(text, add_special_tokens) of an episode's prompt: the first observation appended to the last
    user message (TRL) or to the text; chat prompts rendered with the tools' schemas."""
    if is_conversational(prompt):
        messages = [dict(m) for m in prompt]
        if first_observation:
            messages[-1]["content"] = messages[-1]["content"] + first_observation
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("prompts are chat messages but the tokenizer has no chat_template; set one")
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
        return text, False
    return prompt + (first_observation or ""), True


@torch.no_grad()
def sample_episodes(model, tokenizer, prompts: list, rows: list[dict], make_env: Callable[[], EpisodeEnv],
                    group_size: int, *, seeds: list[int], env_seeds: list[int], limits: EpisodeLimits,
                    eos_ids: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    max_prompt_length: int = 512, carry_cache: bool = True, policy_version: int = 0) -> TrajectoryBatch:
    """G episodes per prompt, all live episodes generating together at each turn.

    prompts / rows: one per group (the dataset rows go to `reset(**row)`); seeds: (B,) one random
    stream per episode, continued across its turns; env_seeds: one per group, so a group's G
    episodes start from the same state (checked: their first observations must agree).
    carry_cache: keep the KV cache across turns (finished episodes' rows dropped, the next turn's
    new tokens appended) instead of prefilling the whole history again each turn.
    """
    B, G = len(prompts) * group_size, group_size
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = torch.tensor(eos_ids, device=device)
    envs = [make_env() for _ in range(B)]
    episodes = [Episode() for _ in range(B)]
    first = []
    for i, env in enumerate(envs):
        t0 = time.perf_counter()
        first.append(env.reset(rows[i // G], env_seeds[i // G]))
        episodes[i].env_seconds += time.perf_counter() - t0
    for g in range(len(prompts)):
        if len(set(first[g * G:(g + 1) * G])) > 1:
            raise DataError(f"the {G} episodes of prompt {g} got different first observations from reset with one "
                            "seed; make reset deterministic given its seed (or Python's random)")
    tools = envs[0].schemas
    rendered = [render_episode_prompt(tokenizer, p, first[g * G], tools) for g, p in enumerate(prompts)]
    if len({add for _, add in rendered}) > 1:
        raise DataError("mix of chat and plain-text prompts in one batch; use one kind")
    prompt_ids, prompt_mask, n_trunc = encode_prompts(tokenizer, [t for t, _ in rendered], max_prompt_length,
                                                      rendered[0][1], device)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    bridge = ChatBridge(tokenizer, envs[0].observation_role, tools)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    prompt_rows = [prompt_ids[i][prompt_mask[i]].tolist() for i in range(B)]
    hist = [[] for _ in range(B)]  # token ids after the prompt
    is_action = [[] for _ in range(B)]
    turn_of = [[] for _ in range(B)]
    logps = [[] for _ in range(B)]
    pending = [list(r) for r in prompt_rows]  # tokens not yet in the KV cache
    done = [False] * B
    past, past_mask, past_rows, cache_arg = None, None, None, cache_kwarg(model)
    was_training = model.training
    model.eval()
    try:
        for turn in range(limits.max_turns):
            live = [i for i in range(B) if not done[i]]
            if not live:
                break
            budget = [min(limits.max_new_tokens, limits.episode_tokens - len(hist[i])) for i in live]
            if past is not None and carry_cache and hasattr(past, "batch_select_indices"):
                keep = torch.tensor([past_rows.index(i) for i in live], device=device)
                past.batch_select_indices(keep)
                past_mask = past_mask[keep]
                blocks = [pending[i] for i in live]
            else:
                past, past_mask = None, None
                blocks = [prompt_rows[i] + hist[i] for i in live]
            tokens, token_logp, past, past_mask = _sample_turn(
                model, past, past_mask, blocks, [generators[i] for i in live], budget, eos, pad,
                temperature, top_k, top_p, cache_arg, device)
            past_rows = live
            for j, i in enumerate(live):
                ep = episodes[i]
                row = tokens[j]
                ended = bool(row) and int(row[-1]) in eos_ids
                start = len(hist[i])
                hist[i] += row
                is_action[i] += [True] * len(row)
                turn_of[i] += [turn] * len(row)
                logps[i] += token_logp[j]
                ep.turns += 1
                text = tokenizer.decode(row, skip_special_tokens=True)
                ep.messages.append({"role": "assistant", "content": text})
                if not ended:  # out of tokens mid-turn: cut short, not finished
                    ep.truncated, done[i] = True, True
                    continue
                t0 = time.perf_counter()
                result = envs[i].step(text)
                ep.env_seconds += time.perf_counter() - t0
                ep.tool_calls += result.tool_calls
                ep.tool_errors += result.tool_errors
                if result.reward is not None:
                    ep.rewards.append((start + len(row) - 1, result.reward))
                if result.done:
                    ep.truncated, done[i] = result.truncated, True
                    continue
                obs = bridge.ids(result.observation or "")
                ep.messages.append({"role": envs[i].observation_role, "content": result.observation or ""})
                if len(hist[i]) + len(obs) + 1 > limits.episode_tokens or turn == limits.max_turns - 1:
                    ep.truncated, done[i] = True, True  # no room (or no turn left) to answer
                    continue
                hist[i] += obs
                is_action[i] += [False] * len(obs)
                turn_of[i] += [turn] * len(obs)
                logps[i] += [0.0] * len(obs)
                pending[i] = [row[-1]] + obs  # the EOS was sampled, never fed
    finally:
        model.train(was_training)
    for i, env in enumerate(envs):
        t0 = time.perf_counter()
        final = env.final_reward()
        episodes[i].env_seconds += time.perf_counter() - t0
        if final is not None:
            last = max(t for t, a in enumerate(is_action[i]) if a) if any(is_action[i]) else 0
            episodes[i].rewards.append((last, final))
        episodes[i].environment = env.instance
    T = max(len(h) for h in hist)
    completion_ids = torch.full((B, T), pad, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.bool)
    action_mask = torch.zeros(B, T, dtype=torch.bool)
    turn_ids = torch.zeros(B, T, dtype=torch.long)
    sampler_logp = torch.zeros(B, T)
    for i in range(B):
        n = len(hist[i])
        completion_ids[i, :n] = torch.tensor(hist[i], dtype=torch.long)
        completion_mask[i, :n] = True
        action_mask[i, :n] = torch.tensor(is_action[i], dtype=torch.bool)
        turn_ids[i, :n] = torch.tensor(turn_of[i], dtype=torch.long)
        turn_ids[i, n:] = turn_of[i][-1] if n else 0
        sampler_logp[i, :n] = torch.tensor(logps[i])
    completions = tokenizer.batch_decode(hist, skip_special_tokens=True)
    return TrajectoryBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device), action_mask=action_mask.to(device),
        truncated=torch.tensor([e.truncated for e in episodes], device=device),
        group=torch.arange(B, device=device) // G, policy_version=torch.full((B,), policy_version, device=device),
        completions=completions, sampler_logp=sampler_logp.to(device), prompts_truncated=n_trunc,
        episodes=episodes, turn_ids=turn_ids.to(device))


def _sample_turn(model, past, past_mask, blocks, generators, budget, eos, pad, temperature, top_k, top_p,
                 cache_arg, device):
    """One turn for the live rows: feed each row's new tokens (left padded) on the cache, then
    sample until every row has its EOS or its token budget. Returns per row the sampled tokens and
    their log-probs under softmax(z / tau), the cache and its (rows, length) attention mask (pads
    and finished rows' columns masked out, so the cache can serve the next turn)."""
    n = len(blocks)
    W = max(len(b) for b in blocks)
    block = torch.full((n, W), pad, dtype=torch.long, device=device)
    block_mask = torch.zeros(n, W, dtype=torch.long, device=device)
    for j, b in enumerate(blocks):
        block[j, W - len(b):] = torch.tensor(b, dtype=torch.long, device=device)
        block_mask[j, W - len(b):] = 1
    cached = past_mask.sum(1, keepdim=True) if past_mask is not None else torch.zeros(n, 1, dtype=torch.long, device=device)
    positions = (cached + block_mask.cumsum(1) - 1).clamp(min=0)
    mask = block_mask if past_mask is None else torch.cat([past_mask, block_mask], 1)
    kwargs = {cache_arg: past} if past is not None else {}
    out = model(input_ids=block, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
    past = returned_cache(out)
    logits = out.logits[:, -1, :]
    next_position = positions[:, -1:] + 1
    budget_t = torch.tensor(budget, device=device)
    finished = budget_t <= 0
    tokens, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    step = 0
    while not bool(finished.all()):
        z = logits.float() / temperature
        logp_all = torch.log_softmax(z, dim=-1)
        token = torch.argmax(filter_logits(z, top_k, top_p) + gumbel_noise(generators, z.shape[-1], device), dim=-1)
        logp = logp_all.gather(1, token.unsqueeze(1)).squeeze(1)
        for j in (~finished).nonzero().flatten().tolist():
            tokens[j].append(int(token[j]))
            logps[j].append(float(logp[j]))
        step += 1
        was_live = ~finished
        finished = finished | torch.isin(token, eos) | (step >= budget_t)
        feed = was_live & ~finished  # a row's last token (its EOS) is not fed: the next turn feeds it
        if bool(finished.all()):
            break
        mask = torch.cat([mask, feed.long().unsqueeze(1)], 1)
        out = model(input_ids=torch.where(feed, token, torch.full_like(token, pad)).unsqueeze(1),
                    attention_mask=mask, position_ids=next_position, use_cache=True, **{cache_arg: past})
        past = returned_cache(out)
        logits = out.logits[:, -1, :]
        next_position = next_position + feed.long().unsqueeze(1)
    return tokens, logps, past, mask


def reward_completions(batch: TrajectoryBatch, conversational: bool) -> list:
    """What reward functions get as `completions` for episodes: the messages after the prompt, turn by
    turn, for chat prompts (TRL's convention); the whole text after the prompt otherwise."""
    if conversational:
        return [ep.messages for ep in batch.episodes]
    return list(batch.completions)


def environment_token_rewards(batch: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_rewards (B, T), has_reward (B,)): the environment's rewards, each on the last token of its turn."""
    B, T = batch.completion_ids.shape
    r = torch.zeros(B, T)
    has = torch.zeros(B, dtype=torch.bool)
    for i, ep in enumerate(batch.episodes):
        for position, value in ep.rewards:
            r[i, position] += value
            has[i] = True
    return r.to(batch.completion_ids.device), has.to(batch.completion_ids.device)


def episode_counts(episodes: list[Episode]) -> torch.Tensor:
    """(B, 4) float64: turns, tool calls, tool errors, truncated of each episode (gathered over processes)."""
    return torch.tensor([[e.turns, e.tool_calls, e.tool_errors, float(e.truncated)] for e in episodes],
                        dtype=torch.float64).view(-1, 4)


def episode_metrics(counts) -> dict:
    """Per-iteration episode metrics from `episode_counts` (or the episodes): turns per episode
    (mean, max), tool calls and tool errors per episode, truncated episodes."""
    if not isinstance(counts, torch.Tensor):
        counts = episode_counts(counts)
    mean = counts.mean(0) if len(counts) else torch.zeros(4, dtype=torch.float64)
    return {"turns_mean": float(mean[0]), "turns_max": int(counts[:, 0].max()) if len(counts) else 0,
            "tool_calls_per_episode": float(mean[1]), "tool_errors_per_episode": float(mean[2]),
            "truncated_episodes": int(counts[:, 3].sum())}


ENV_SEED_SAMPLE = 2**31
"""The `sample` argument of `row_seed` that names an environment's seed (one per prompt, shared by its G episodes)."""


class EpisodeSampler:
    """What the trainer calls instead of the single-turn sampler when `config.environment` is set."""

    def __init__(self, config, tokenizer, eos_ids):
        from lmpg.environments import load_environment

        self.config, self.tokenizer, self.eos_ids = config, tokenizer, eos_ids
        self.factory = load_environment(config.environment)
        self.limits = EpisodeLimits(config.max_turns, config.max_new_tokens, config.max_episode_tokens)

    def make_env(self) -> EpisodeEnv:
        return EpisodeEnv(self.factory(), self.config.tool_format, self.config.tool_timeout)

    def sample(self, policy, prompts, rows, positions, iteration, seeds, greedy: bool = False) -> TrajectoryBatch:
        """G episodes per prompt (a TrajectoryBatch with action_mask holes, turn_ids, episodes,
        sampler_logp); positions: the prompts' places in the global batch (for the seeds)."""
        from lmpg.sampler import row_seed

        c = self.config
        env_seeds = [row_seed(c.seed, iteration, p, ENV_SEED_SAMPLE) for p in positions]
        return sample_episodes(policy, self.tokenizer, prompts, rows, self.make_env, c.group_size, seeds=seeds,
                               env_seeds=env_seeds, limits=self.limits, eos_ids=self.eos_ids,
                               temperature=c.temperature, top_k=1 if greedy else c.top_k, top_p=c.top_p,
                               max_prompt_length=c.max_prompt_length, carry_cache=c.cache_across_turns,
                               policy_version=iteration)


def score_episodes(scorer, batch: TrajectoryBatch, prompts, rows, prompt_column, step):
    """(token_rewards (B, T), scored (B,), scores): the reward functions' rewards on the last
    action token (completions turn by turn for chat prompts, each episode's environment passed as
    `environments`) plus the environment's, each on the last token of its turn. scores: the
    functions' RewardScores (no functions when scorer is None)."""
    from lmpg.rewards.scorer import RewardScores

    env_r, env_has = environment_token_rewards(batch)
    if scorer is None:
        return env_r, env_has, RewardScores(names=[], values=[], weights=[])
    index = batch.prompt_index
    prompts_rep = [prompts[i] for i in index]
    completions = reward_completions(batch, is_conversational(prompts[0]))
    ids = [row[m].tolist() for row, m in zip(batch.completion_ids, batch.action_mask)]
    columns = {k: [v[i] for i in index] for k, v in rows.items() if k != prompt_column}
    columns["episodes"] = batch.episodes
    scores = scorer.score(prompts_rep, completions, ids, step=step, columns=columns,
                          environments=[ep.environment for ep in batch.episodes])
    fn_r, fn_has = scores.to_token_rewards(batch.action_mask.cpu())
    return fn_r.to(env_r.device) + env_r, fn_has.to(env_has.device) | env_has, scores

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

The loop (`sample_episodes`) carries one `EpisodeState` per episode through named steps:
1. `start_episodes`: one environment per episode, reset; the prompts rendered with reset's text;
2. `take_turn`: the policy's turn in every live episode, from a `TurnSampler` (`lmpg.generation`:
   lmpg's KV-cache sampler, or any other) given each episode's whole token history;
3. `step_environments`: the environments answer, together (`lmpg.environments.EnvironmentCalls`);
   each episode goes on or ends for one of `ENDINGS`;
4. `finish_episodes`: get_reward; 5. `to_batch`: one TrajectoryBatch.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmpg.batch import TrajectoryBatch
from lmpg.data import is_conversational
from lmpg.environments import EnvironmentCalls, EpisodeEnv, TurnResult, rewards_itself
from lmpg.errors import ConfigError, DataError, EnvError
from lmpg.generation import LmpgTurnSampler, SampledTurn, TurnSampler
from lmpg.rewards.specs import one_line
from lmpg.rollout import encode_prompts
from lmpg.tools import call_marker_ids, decode_turn


@dataclass
class EpisodeLimits:
    """Limits that end an episode early; an episode that hits one is truncated, never finished."""

    max_turns: int = 4
    """Policy turns per episode."""
    max_new_tokens: int = 64
    """Tokens per policy turn (a turn that reaches it without EOS ends the episode, `ENDINGS`)."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt, the policy's and the environment's (default: max_turns * max_new_tokens * 2)."""

    @property
    def episode_tokens(self) -> int:
        return self.max_episode_tokens or 2 * self.max_turns * self.max_new_tokens


ENDINGS = ("done", "env_truncated", "max_turns", "max_new_tokens", "max_episode_tokens", "error", "timeout")
"""Why an episode ended (`Episode.ended`, counted per iteration as `episodes_ended/<why>`):

- done: the environment ended it (step's done, or a turn without a tool call: the final answer);
- env_truncated: the environment cut it short (gymnasium's truncated);
- max_turns: the last allowed turn passed and the episode would have gone on (its tool calls, if
  any, are not run, as TRL's max_tool_calling_iterations has it);
- max_new_tokens: a turn reached max_new_tokens without its EOS. A step-API environment still
  gets step() of the cut action (its reward counts); a TRL-shaped one's cut calls are not run. The
  episode is scored (get_reward, the reward functions), then ends;
- max_episode_tokens: the episode's tokens (max_episode_tokens) ran out: a turn cut by it, or an
  observation with no room left to answer it;
- error, timeout: environment code raised or returned something unusable, or did not return
  within env_timeout (`reward_on_error`: the episode unscored, or the run stopped).
"""
TRUNCATING = ("env_truncated", "max_turns", "max_new_tokens", "max_episode_tokens")
"""Endings that truncate an episode (`Episode.truncated`)."""


@dataclass
class Episode:
    """One episode as it happened: the turns, what the environment said, and the counts."""

    messages: list = field(default_factory=list)
    """The conversation after the prompt as the policy lived it: each of its turns
    ({"role": "assistant", "content": text} with TRL's "tool_calls" when it called tools) and each
    observation it read ({"role": "tool" | "user", "content": ...}). It ends with the policy's last
    turn; reward functions get it as `completions` for chat prompts (TRL's convention)."""
    transcript: list = field(default_factory=list)
    """The whole episode for the logs: `messages` plus the observations the policy never read (the
    environment's last answer), the environment's reward of a turn as "reward" on its message."""
    first_observation: str | None = None
    """What reset() returned (appended to the prompt)."""
    rewards: list = field(default_factory=list)
    """(position after the prompt, reward) of each reward the environment gave."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    ended: str | None = None
    """Why it ended, one of `ENDINGS`."""
    error: str | None = None
    """What failed in the environment's code (ended 'error' or 'timeout'), one line."""
    env_seconds: float = 0.0
    """Its share of the wall time the batch spent in environment code (calls run together are
    shared out among their episodes, so the episodes' sum is the batch's time)."""
    environment: object = None
    """The environment instance, for reward functions that read its state (TRL's `environments`)."""

    @property
    def final_answer(self) -> str:
        """The text of the policy's last turn ('' before its first)."""
        said = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return said[-1] if said else ""

    @property
    def env_reward(self) -> float | None:
        """The environment's own reward of the episode (its per-turn rewards and get_reward), or None."""
        return sum(r for _, r in self.rewards) if self.rewards else None


class ChatBridge:
    """The tokens a chat template puts around an environment message between two policy turns.

    Derived once by rendering [user, assistant] and [user, assistant, message] with the generation
    prompt, and cutting the first off the second after the assistant's end-of-turn token (the EOS
    the policy samples itself): what remains is head + content + tail, checked with two different
    contents and with the template not rewriting the earlier turns. `ids(content)` is then
    head_ids + encode(content) + tail_ids: the environment's text tokenized on its own, the history
    never re-tokenised. With no chat template (plain-text prompts) head and tail are empty.
    """

    def __init__(self, tokenizer, role: str, tools: list | None = None, chat_template_kwargs: dict | None = None):
        self.tokenizer, self.chat_template_kwargs = tokenizer, dict(chat_template_kwargs or {})
        head = tail = ""
        if getattr(tokenizer, "chat_template", None):
            head, tail = self._derive(role, tools)
        self.head_ids = tokenizer.encode(head, add_special_tokens=False) if head else []
        self.tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []

    def _derive(self, role, tools):
        tok = self.tokenizer

        def render(messages, generation):
            return tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=generation, **self.chat_template_kwargs)

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


def render_episode_prompt(tokenizer, prompt, first_observation: str | None, tools: list | None,
                          chat_template_kwargs: dict | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens) of an episode's prompt: the first observation appended to the last
    user message (TRL) or to the text; chat prompts rendered with the tools' schemas and
    `chat_template_kwargs`."""
    if is_conversational(prompt):
        messages = [dict(m) for m in prompt]
        if first_observation:
            messages[-1]["content"] = messages[-1]["content"] + first_observation
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("prompts are chat messages but the tokenizer has no chat_template; set one")
        text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        return text, False
    return prompt + (first_observation or ""), True


@dataclass
class EpisodeState:
    """One episode while the loop runs it: its environment, its tokens so far, whether it goes on."""

    env: EpisodeEnv
    episode: Episode
    index: int
    """Its row in the batch."""
    row: dict
    """The dataset row its environment was reset from (for messages)."""
    prompt_ids: list[int] = field(default_factory=list)
    """The rendered prompt (reset's text included), no padding."""
    ids: list[int] = field(default_factory=list)
    """Every token after the prompt: the policy's turns and the environment's observations."""
    is_action: list[bool] = field(default_factory=list)
    """Per token of `ids`: the policy sampled it (an action), or the environment wrote it."""
    turn_of: list[int] = field(default_factory=list)
    """Per token of `ids`: the turn it belongs to (an observation belongs to the turn it answers)."""
    logp: list[float] = field(default_factory=list)
    """Per token of `ids`: the sampler's log-prob of an action, 0.0 for the environment's tokens."""
    live: bool = True
    cut: str | None = None
    """Why the last turn stopped short of its EOS ('max_new_tokens' or 'max_episode_tokens'), if it did."""

    @property
    def history(self) -> list[int]:
        """What the policy's next turn conditions on: the prompt and everything after it."""
        return self.prompt_ids + self.ids

    @property
    def failed(self) -> bool:
        return self.episode.ended in ("error", "timeout")

    def append(self, ids: list[int], turn: int, logp: list[float] | None = None) -> None:
        """Tokens of one turn: the policy's (with their log-probs) or the environment's (logp None)."""
        self.ids += ids
        self.is_action += [logp is not None] * len(ids)
        self.turn_of += [turn] * len(ids)
        self.logp += logp if logp is not None else [0.0] * len(ids)

    def end(self, why: str) -> None:
        """The episode is over, for the reason `why` (one of `ENDINGS`)."""
        self.live = False
        self.episode.ended, self.episode.truncated = why, why in TRUNCATING


def call_environments(runner: EnvironmentCalls, states: list[EpisodeState], calls: dict[int, Callable], method: str,
                      on_error: str) -> dict[int, object]:
    """Run calls into the environments of some episodes together (`EnvironmentCalls`); returns the
    value of each call that succeeded, by episode. A failed call ends its episode as 'error' or
    'timeout' (on_error='none': unscored) or stops the run in one line (on_error='raise'). The
    wall time is shared out among the episodes called (`Episode.env_seconds`)."""
    if not calls:
        return {}
    t0 = time.perf_counter()
    outcomes = runner.run(list(calls.values()))
    share = (time.perf_counter() - t0) / len(calls)
    values = {}
    for i, out in zip(calls, outcomes):
        state = states[i]
        state.episode.env_seconds += share
        if out.failure is None:
            values[i] = out.value
            continue
        what = f"{state.env.name}.{method} {out.failure}"
        if on_error == "raise":
            raise EnvError(f"environment {what} (episode {i} of the batch, row {one_line(repr(state.row), 100)}); fix "
                           "it, or set reward_on_error: none to leave such episodes unscored (counted as "
                           "episodes_ended/error and /timeout)")
        state.episode.error = what
        state.end("timeout" if out.timed_out else "error")
    return values


@dataclass
class EpisodeBatch:
    """The episodes of one batch as they start: one state per row and the rendered prompts."""

    states: list[EpisodeState]
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompts, reset's text included."""
    prompt_mask: torch.Tensor
    prompts_truncated: int
    bridge: ChatBridge
    """The tokens around the environment's messages (`ChatBridge`)."""


def start_episodes(tokenizer, prompts: list, rows: list[dict], make_env: Callable[[], EpisodeEnv], group_size: int, *,
                   env_seeds: list[int], max_prompt_length: int, device, runner: EnvironmentCalls,
                   on_error: str, chat_template_kwargs: dict | None = None) -> EpisodeBatch:
    """One environment per episode, reset from its group's row and seed; the prompts rendered with
    reset's text (the G episodes of a group must agree on it) and the tools' schemas. An episode
    whose reset failed never takes a turn."""
    B, G = len(prompts) * group_size, group_size
    states = [EpisodeState(make_env(), Episode(), i, rows[i // G]) for i in range(B)]
    for s in states:
        s.env.awaiter = runner.await_coroutine
    first = call_environments(runner, states, {i: functools.partial(s.env.reset, s.row, env_seeds[i // G])
                                               for i, s in enumerate(states)}, "reset", on_error)
    observations = []
    for g in range(len(prompts)):
        group = [first[i] for i in range(g * G, (g + 1) * G) if i in first]
        if len(set(group)) > 1:
            raise DataError(f"the {G} episodes of prompt {g} got different first observations from reset with one "
                            "seed; make reset deterministic given its seed (or Python's random)")
        observations.append(group[0] if group else None)
    tools = states[0].env.schemas
    rendered = [render_episode_prompt(tokenizer, p, observations[g], tools, chat_template_kwargs)
                for g, p in enumerate(prompts)]
    if len({add for _, add in rendered}) > 1:
        raise DataError("mix of chat and plain-text prompts in one batch; use one kind")
    prompt_ids, prompt_mask, n_trunc = encode_prompts(tokenizer, [t for t, _ in rendered], max_prompt_length,
                                                      rendered[0][1], device)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    for i, s in enumerate(states):
        s.prompt_ids = prompt_ids[i][prompt_mask[i]].tolist()
        s.episode.first_observation = first.get(i)
    bridge = ChatBridge(tokenizer, states[0].env.observation_role, tools, chat_template_kwargs)
    return EpisodeBatch(states, prompt_ids, prompt_mask, n_trunc, bridge)


def take_turn(sampler: TurnSampler, states: list[EpisodeState], live: list[int], turn: int,
              limits: EpisodeLimits) -> list[SampledTurn]:
    """The policy's next turn in each live episode, appended to its tokens: at most max_new_tokens,
    and no more than the episode has room for."""
    budget = [min(limits.max_new_tokens, limits.episode_tokens - len(states[i].ids)) for i in live]
    sampled = sampler.sample(live, [states[i].history for i in live], budget)
    for i, out in zip(live, sampled):
        states[i].append(out.token_ids, turn, out.logp)
        states[i].episode.turns += 1
    return sampled


def record_action(state: EpisodeState, action: SampledTurn, *, limits: EpisodeLimits, tokenizer, eos_ids: list[int],
                  call_markers: set[int] = frozenset()) -> str | None:
    """The policy's turn as text, in the episode's messages; None when the environment is not to
    answer it (a TRL-shaped environment's turn cut short: its calls are not run, the episode ends).
    call_markers: special tokens kept in the text (`lmpg.tools.call_marker_ids`)."""
    ep, tokens = state.episode, action.token_ids
    text = decode_turn(tokenizer, tokens, call_markers)
    ep.messages.append({"role": "assistant", "content": text})
    ep.transcript.append({"role": "assistant", "content": text})
    state.cut = None
    if not (tokens and tokens[-1] in eos_ids):  # out of tokens mid-turn
        state.cut = "max_new_tokens" if len(tokens) >= limits.max_new_tokens else "max_episode_tokens"
        if state.env.kind == "tools":  # a call cut short is not run; get_reward still scores the episode
            state.end(state.cut)
            return None
    return text


def apply_step(state: EpisodeState, result: TurnResult, turn: int, *, limits: EpisodeLimits,
               bridge: ChatBridge) -> None:
    """The environment's answer to the turn: its reward on the turn's last token, and its
    observation appended for the next turn, or the episode's end (`ENDINGS`)."""
    ep, env = state.episode, state.env
    ep.tool_calls += result.tool_calls
    ep.tool_errors += result.tool_errors
    if result.calls:
        ep.messages[-1]["tool_calls"] = ep.transcript[-1]["tool_calls"] = result.calls
    if result.reward is not None:
        ep.rewards.append((len(state.ids) - 1, result.reward))
        ep.transcript[-1]["reward"] = result.reward
    observation = {"role": env.observation_role, "content": result.observation or ""}
    if result.observation is not None or not (state.cut or result.done):
        ep.transcript.append(observation)
    if state.cut or result.done:
        state.end(state.cut or result.ended)
        return
    obs = bridge.ids(observation["content"])
    if len(state.ids) + len(obs) + 1 > limits.episode_tokens:
        state.end("max_episode_tokens")  # no room to answer it
    elif turn == limits.max_turns - 1:
        state.end("max_turns")
    else:
        ep.messages.append(observation)
        state.append(obs, turn)


def step_environments(states: list[EpisodeState], live: list[int], actions: list[SampledTurn], turn: int, *,
                      limits: EpisodeLimits, bridge: ChatBridge, tokenizer, eos_ids: list[int],
                      runner: EnvironmentCalls, on_error: str, call_markers: set[int] = frozenset()) -> None:
    """Every live episode's environment answers the turn its policy just took, all together."""
    texts = {i: record_action(states[i], a, limits=limits, tokenizer=tokenizer, eos_ids=eos_ids,
                              call_markers=call_markers) for i, a in zip(live, actions)}
    last = turn == limits.max_turns - 1
    calls = {i: functools.partial(states[i].env.step, text, last) for i, text in texts.items() if text is not None}
    results = call_environments(runner, states, calls, states[live[0]].env.step_name, on_error)
    for i, result in results.items():
        apply_step(states[i], result, turn, limits=limits, bridge=bridge)


def finish_episodes(states: list[EpisodeState], runner: EnvironmentCalls, on_error: str) -> None:
    """The environments' final rewards (get_reward, all together), each on its episode's last action token."""
    scoring = {i: s.env.final_reward for i, s in enumerate(states) if not s.failed}
    finals = call_environments(runner, states, scoring, "get_reward", on_error)
    for i, final in finals.items():
        s, ep = states[i], states[i].episode
        if final is not None:
            last = max(t for t, a in enumerate(s.is_action) if a) if any(s.is_action) else 0
            ep.rewards.append((last, final))
            said = [m for m in ep.transcript if m["role"] == "assistant"]
            if said:
                said[-1]["reward"] = said[-1].get("reward", 0.0) + final
    for s in states:
        s.episode.environment = s.env.instance


def to_batch(started: EpisodeBatch, tokenizer, *, group_size: int, policy_version: int, device) -> TrajectoryBatch:
    """The episodes as one TrajectoryBatch: the tokens after each prompt right-padded, the
    environment's tokens holes in action_mask, the sampler's log-probs, turn ids."""
    states, pad = started.states, tokenizer.pad_token_id
    B, T = len(states), max(1, max(len(s.ids) for s in states))  # an episode whose reset failed has no tokens
    completion_ids = torch.full((B, T), pad, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.bool)
    action_mask = torch.zeros(B, T, dtype=torch.bool)
    turn_ids = torch.zeros(B, T, dtype=torch.long)
    sampler_logp = torch.zeros(B, T)
    for i, s in enumerate(states):
        n = len(s.ids)
        completion_ids[i, :n] = torch.tensor(s.ids, dtype=torch.long)
        completion_mask[i, :n] = True
        action_mask[i, :n] = torch.tensor(s.is_action, dtype=torch.bool)
        turn_ids[i, :n] = torch.tensor(s.turn_of, dtype=torch.long)
        turn_ids[i, n:] = s.turn_of[-1] if n else 0
        sampler_logp[i, :n] = torch.tensor(s.logp)
    episodes = [s.episode for s in states]
    return TrajectoryBatch(
        prompt_ids=started.prompt_ids, prompt_mask=started.prompt_mask, completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device), action_mask=action_mask.to(device),
        truncated=torch.tensor([e.truncated for e in episodes], device=device),
        group=torch.arange(B, device=device) // group_size,
        policy_version=torch.full((B,), policy_version, device=device),
        completions=[e.final_answer for e in episodes],
        sampler_logp=sampler_logp.to(device), prompts_truncated=started.prompts_truncated, episodes=episodes,
        turn_ids=turn_ids.to(device))


def sample_episodes(model, tokenizer, prompts: list, rows: list[dict], make_env: Callable[[], EpisodeEnv],
                    group_size: int, *, seeds: list[int], env_seeds: list[int], limits: EpisodeLimits,
                    eos_ids: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    max_prompt_length: int = 512, carry_cache: bool = True, policy_version: int = 0,
                    turn_sampler: TurnSampler | None = None, env_timeout: float | None = 60.0,
                    env_workers: int | None = None, on_error: str = "raise",
                    chat_template_kwargs: dict | None = None) -> TrajectoryBatch:
    """G episodes per prompt, all live episodes taking their turn together.

    prompts / rows: one per group (the dataset rows go to `reset(**row)`); seeds: (B,) one random
    stream per episode, continued across its turns; env_seeds: one per group, so a group's G
    episodes start from the same state (checked: their first observations must agree).
    turn_sampler: what generates the turns (`lmpg.generation`); default `LmpgTurnSampler` on
    `model` with the sampling settings given here (carry_cache: keep the KV cache across turns
    instead of prefilling the whole history again each turn).
    env_timeout, env_workers: how long one call into the environments' code may run, and how many
    run at once (`lmpg.environments.EnvironmentCalls`); on_error: what a failing one does
    ('raise': one line; 'none': its episode ends as 'error' / 'timeout', unscored).
    chat_template_kwargs: extra arguments to the chat template for the prompts and the bridge tokens.
    """
    device = next(model.parameters()).device
    if turn_sampler is None:
        turn_sampler = LmpgTurnSampler(model, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, temperature=temperature,
                                       top_k=top_k, top_p=top_p, carry_cache=carry_cache)
    runner = EnvironmentCalls(env_timeout, env_workers)
    try:
        # 1. one environment per episode, reset; the prompts rendered with reset's text
        started = start_episodes(tokenizer, prompts, rows, make_env, group_size, env_seeds=env_seeds,
                                 max_prompt_length=max_prompt_length, device=device, runner=runner, on_error=on_error,
                                 chat_template_kwargs=chat_template_kwargs)
        states = started.states
        markers = call_marker_ids(tokenizer, states[0].env.tool_format) if states[0].env.kind == "tools" else set()
        turn_sampler.start(seeds)
        try:
            for turn in range(limits.max_turns):
                live = [i for i, s in enumerate(states) if s.live]
                if not live:
                    break
                # 2. the policy's turn in every live episode, 3. the environments' answers
                actions = take_turn(turn_sampler, states, live, turn, limits)
                step_environments(states, live, actions, turn, limits=limits, bridge=started.bridge,
                                  tokenizer=tokenizer, eos_ids=eos_ids, runner=runner, on_error=on_error,
                                  call_markers=markers)
        finally:
            turn_sampler.finish()
        # 4. the environments' final rewards
        finish_episodes(states, runner, on_error)
    finally:
        runner.close()
    # 5. one batch
    return to_batch(started, tokenizer, group_size=group_size, policy_version=policy_version, device=device)


def reward_completions(batch: TrajectoryBatch, conversational: bool) -> list:
    """What reward functions get as `completions` for episodes (docs/rewards.md):

    - chat prompts: the messages after the prompt as the policy lived them (`Episode.messages`,
      TRL 1.16's convention), ending with the policy's last turn, so `c[-1]["content"]` is its final
      answer, never the tool's (an observation it did not get to answer is not in them);
    - plain-text prompts: the text of the policy's last turn, its final answer (the whole episode is
      in the `episodes` column).
    """
    if conversational:
        return [ep.messages for ep in batch.episodes]
    return [ep.final_answer for ep in batch.episodes]


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
    """(B, 4 + len(ENDINGS)) float64 of each episode (gathered over processes): turns, tool calls,
    tool errors, truncated, then one column per ending (`ENDINGS`), 1 where it ended so."""
    rows = [[e.turns, e.tool_calls, e.tool_errors, float(e.truncated)] + [float(e.ended == why) for why in ENDINGS]
            for e in episodes]
    return torch.tensor(rows, dtype=torch.float64).view(-1, 4 + len(ENDINGS))


def episode_metrics(counts) -> dict:
    """Per-iteration episode metrics from `episode_counts` (or the episodes): turns per episode
    (mean, max), tool calls and tool errors per episode, truncated episodes, and how many episodes
    ended for each reason (`episodes_ended/<why>`, `ENDINGS`)."""
    if not isinstance(counts, torch.Tensor):
        counts = episode_counts(counts)
    mean = counts.mean(0) if len(counts) else torch.zeros(counts.shape[1], dtype=torch.float64)
    metrics = {"turns_mean": float(mean[0]), "turns_max": int(counts[:, 0].max()) if len(counts) else 0,
               "tool_calls_per_episode": float(mean[1]), "tool_errors_per_episode": float(mean[2]),
               "truncated_episodes": int(counts[:, 3].sum())}
    metrics.update({f"episodes_ended/{why}": int(counts[:, 4 + k].sum()) for k, why in enumerate(ENDINGS)})
    return metrics


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

    def turn_sampler(self, policy, greedy: bool = False) -> LmpgTurnSampler:
        """lmpg's own turn sampler on `policy` with the config's sampling settings (greedy: top_k=1 on
        the policy's own logits, no min_p or repetition penalty)."""
        c = self.config
        return LmpgTurnSampler(policy, pad_id=self.tokenizer.pad_token_id, eos_ids=self.eos_ids,
                               temperature=c.temperature, top_k=1 if greedy else c.top_k, top_p=c.top_p,
                               min_p=0.0 if greedy else c.min_p,
                               repetition_penalty=1.0 if greedy else c.repetition_penalty,
                               carry_cache=c.cache_across_turns)

    def sample(self, policy, prompts, rows, positions, iteration, seeds, greedy: bool = False,
               turn_sampler: TurnSampler | None = None) -> TrajectoryBatch:
        """G episodes per prompt (a TrajectoryBatch with action_mask holes, turn_ids, episodes,
        sampler_logp); positions: the prompts' places in the global batch (for the seeds);
        turn_sampler: what generates the turns (default: `self.turn_sampler(policy, greedy)`)."""
        from lmpg.sampler import row_seed

        c = self.config
        env_seeds = [row_seed(c.seed, iteration, p, ENV_SEED_SAMPLE) for p in positions]
        return sample_episodes(policy, self.tokenizer, prompts, rows, self.make_env, c.group_size, seeds=seeds,
                               env_seeds=env_seeds, limits=self.limits, eos_ids=self.eos_ids,
                               max_prompt_length=c.max_prompt_length, policy_version=iteration,
                               turn_sampler=turn_sampler or self.turn_sampler(policy, greedy),
                               env_timeout=c.env_timeout, env_workers=c.env_workers, on_error=c.reward_on_error,
                               chat_template_kwargs=c.chat_template_kwargs)


def environment_name(batch: TrajectoryBatch, taken: list[str]) -> str:
    """The name the environment's own reward is logged under: its class name, as TRL logs it
    (`reward/NAME`), with '_env' appended if a reward function already has it."""
    instance = next((ep.environment for ep in batch.episodes if ep.environment is not None), None)
    name = type(instance).__name__ if instance is not None else "environment"
    return name + "_env" if name in taken else name


def score_episodes(scorer, batch: TrajectoryBatch, prompts, rows, prompt_column, step):
    """(token_rewards (B, T), scored (B,), scores): the reward functions' rewards on the last
    action token (`reward_completions`, each episode's environment passed as `environments`) plus
    the environment's, each on the last token of its turn. scores: the functions' RewardScores,
    the environment's own reward (its per-turn rewards and get_reward, summed per episode) appended
    as one more column under its class name, for the logs only (its tokens' rewards are already in
    token_rewards)."""
    from lmpg.rewards.scorer import RewardScores

    env_r, env_has = environment_token_rewards(batch)
    if scorer is None:
        token_rewards, scored, scores = env_r, env_has, RewardScores(names=[], values=[], weights=[])
    else:
        index = batch.prompt_index
        prompts_rep = [prompts[i] for i in index]
        completions = reward_completions(batch, is_conversational(prompts[0]))
        ids = [row[m].tolist() for row, m in zip(batch.completion_ids, batch.action_mask)]
        columns = {k: [v[i] for i in index] for k, v in rows.items() if k != prompt_column}
        columns["episodes"] = batch.episodes
        scores = scorer.score(prompts_rep, completions, ids, step=step, columns=columns,
                              environments=[ep.environment for ep in batch.episodes])
        fn_r, fn_has = scores.to_token_rewards(batch.action_mask.cpu())
        token_rewards, scored = fn_r.to(env_r.device) + env_r, fn_has.to(env_has.device) | env_has
    failed = torch.tensor([ep.ended in ("error", "timeout") for ep in batch.episodes], device=scored.device)
    if bool(failed.any()):  # environment code failed: the episode is unscored (reward_on_error: none)
        scored = scored & ~failed
        token_rewards = token_rewards * (~failed).unsqueeze(1).to(token_rewards.dtype)
    env_values = [None if ep.ended in ("error", "timeout") else ep.env_reward for ep in batch.episodes]
    instance = next((ep.environment for ep in batch.episodes if ep.environment is not None), None)
    if instance is not None and rewards_itself(instance):  # by class, so every process logs the same columns
        scores.names = scores.names + [environment_name(batch, scores.names)]
        scores.values, scores.weights = scores.values + [env_values], scores.weights + [1.0]
    return token_rewards, scored, scores

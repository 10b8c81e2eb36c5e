"""TrajectoryBatch: the one record a sampled batch travels in, from the sampler to the update.

Token-in, token-out: the ids are exactly the tokens the policy sampled (and, in a multi-turn
episode, the tokens the environment wrote, appended as tokenized), never re-tokenised from text.
The sampler fills the sampled fields; each later step of an iteration fills its own field
(`token_rewards` and `scored` by scoring, `logp_old` / `logp_ref` by the no-grad forwards, `adv` by
`lmpg.advantages`) and the update reads them. Nothing travels beside it in an untyped dict.

Shapes: B sequences (the G samples of a prompt contiguous), P prompt tokens (left padded),
T tokens after the prompt (right padded).

Masks, each with one meaning:
- `prompt_mask` (B, P): True on real prompt tokens (attention).
- `completion_mask` (B, T): True on every token after the prompt that exists: the policy's
  actions and, in a multi-turn episode, the environment's tokens between them (attention).
- `action_mask` (B, T): True on the policy's own sampled tokens, the actions a_t whose
  log pi(a_t | s_t) enters the policy gradient; a subset of `completion_mask`. For a single-turn
  completion the two are equal; in a multi-turn episode it has holes where the environment wrote
  (those tokens are dynamics: part of the state later actions condition on, with no log-prob term).
The loss counts a token where `loss_mask` = action_mask & sample_mask is True; `sample_mask` (B,) is
`scored`, less the rows `excluded` (mask_truncated_completions: the truncated ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrajectoryBatch:
    """B trajectories sampled from one policy version, with what each step of an iteration adds."""

    # --- filled by the sampler ---
    prompt_ids: torch.Tensor
    """(B, P) int64, left padded: the initial state s_0 of each trajectory."""
    prompt_mask: torch.Tensor
    """(B, P) bool: True on real prompt tokens."""
    completion_ids: torch.Tensor
    """(B, T) int64, right padded: every token after the prompt, exactly as sampled or appended."""
    completion_mask: torch.Tensor
    """(B, T) bool: True on tokens that exist (policy and environment tokens), False on padding."""
    action_mask: torch.Tensor
    """(B, T) bool: True on the policy's own sampled tokens (subset of completion_mask)."""
    truncated: torch.Tensor
    """(B,) bool: the trajectory hit a length limit before it ended (no EOS / episode not done)."""
    group: torch.Tensor
    """(B,) int64: the prompt (initial state) each row was sampled from, its index in this batch's
    prompts; rows with one id form a group for the group baselines."""
    policy_version: torch.Tensor
    """(B,) int64: the iteration whose policy sampled each row (pi_old's version)."""
    completions: list[str]
    """(B,) the text after the prompt, decoded from the ids (special tokens skipped)."""
    sampler_logp: torch.Tensor | None = None
    """(B, T) fp32 or None: log q(a_t | s_t) of the distribution the sampler drew each action from, 0 off
    the actions (`lmpg.sampler.sampling_logits`): pi_old's own where no truncation or penalty is on."""
    grad_sq_norm: torch.Tensor | None = None
    """(B, T) fp32 or None: ||grad_z log pi_old(a_t | s_t)||^2 = (1 - 2 pi(a_t) + sum_v pi(v)^2) / tau^2
    at each action, 0 off the actions (`lmpg.logprobs.logit_grad_sq_norm`); summed over a row, the
    weight of the optimal baselines (`lmpg.advantages.optimal_baseline`). Filled when they need it."""
    prompts_truncated: int = 0
    """Prompts cut from the left to max_prompt_length."""
    episodes: list | None = None
    """(B,) per-row episode records (turns, tool calls) from a multi-turn rollout, or None."""
    turn_ids: torch.Tensor | None = None
    """(B, T) int64 or None: the policy turn of a multi-turn episode each token is in (an environment
    token carries the turn it follows); reward-to-go discounts per turn with it."""

    # --- filled by the later steps of an iteration ---
    token_rewards: torch.Tensor | None = None
    """(B, T) fp32: reward r_t received after token t (the weighted sum over reward functions): the
    task's reward, what reward_mean logs."""
    kl_penalised_rewards: torch.Tensor | None = None
    """(B, T) fp32 with kl_in=reward: r_t - kl_coef * KL_t on the actions (`lmpg.kl.kl_penalised_rewards`),
    what the returns sum instead of token_rewards; None without a KL penalty in the reward."""
    normalised_rewards: torch.Tensor | None = None
    """(B, T) fp32 with reward_aggregation=normalize_then_sum: the weighted sum of each reward function's
    group-normalised reward (GDPO, `lmpg.advantages.group_normalised_rewards`) on the last token, what the
    returns sum instead of token_rewards; None otherwise."""
    scored: torch.Tensor | None = None
    """(B,) bool: the row has a reward (a row every function left unscored is left out of the loss)."""
    logp_old: torch.Tensor | None = None
    """(B, T) fp32: log pi_old(a_t | s_t), the policy that sampled the batch."""
    logp_ref: torch.Tensor | None = None
    """(B, T) fp32: log pi_ref(a_t | s_t) of the KL's reference policy, or None without KL."""
    adv: torch.Tensor | None = None
    """(B, T) fp32: the advantage A_t weighting grad log pi(a_t | s_t)."""
    excluded: torch.Tensor | None = None
    """(B,) bool or None: scored rows left out of the baselines, the std and the loss all the same
    (mask_truncated_completions: the rows the length limit cut)."""

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Action tokens in the batch (what tokens/s counts)."""
        return int(self.action_mask.sum())

    @property
    def sample_mask(self) -> torch.Tensor | None:
        """(B,) bool: the rows that count in the baselines, the std and the loss: scored and not
        `excluded` (None before scoring)."""
        if self.scored is None or self.excluded is None:
            return self.scored
        return self.scored & ~self.excluded

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) bool: action tokens of the rows of `sample_mask`, the tokens the loss counts."""
        if self.sample_mask is None:
            return self.action_mask
        return self.action_mask & self.sample_mask.unsqueeze(1)

    @property
    def rewards_for_returns(self) -> torch.Tensor:
        """(B, T): the per-token rewards the returns sum: kl_penalised_rewards or normalised_rewards when
        set (the config allows one at most), else token_rewards."""
        if self.kl_penalised_rewards is not None:
            return self.kl_penalised_rewards
        return self.token_rewards if self.normalised_rewards is None else self.normalised_rewards

    @property
    def prompt_index(self) -> list[int]:
        """(B,) `group` as a list of ints (the index of each row's prompt)."""
        return self.group.tolist()

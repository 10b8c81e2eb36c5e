"""lmpg/kl.py with kl_in=reward: the penalised rewards by hand, and in the trainer the rewards the
advantages see are the scored rewards minus kl_coef * KL(pi_old || pi_ref), while reward_mean logs the
task's reward and kl_penalised_reward_mean the penalised one. (The estimators alone are tested in
tests/test_losses.py.)"""

import math

import pytest
import torch

from lmpg import PGTrainer
from lmpg.kl import kl_penalised_rewards
from lmpg.metrics import read_jsonl

from conftest import count_a, small_config

# Two rows of three tokens; row 1's middle token is not an action (an environment token of a
# multi-turn episode), so it keeps its reward whatever the KL there.
REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
LOGP_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.0, -3.0]])
LOGP_REF = torch.tensor([[-1.5, -2.0, -1.0], [-0.2, -2.0, -1.0]])
ACTIONS = torch.tensor([[True, True, True], [True, False, True]])
# x = logp_ref - logp_old = [[-0.5, 0, -0.5], [0, -1, 2]]; beta = 0.1
#   k1 = -x            = [[0.5, 0, 0.5], [0, (1), -2]]
#   k2 = x^2 / 2       = [[0.125, 0, 0.125], [0, (0.5), 2]]
#   k3 = e^x - 1 - x   = [[e^-0.5 - 0.5, 0, e^-0.5 - 0.5], [0, (e^-1), e^2 - 3]]
K3_HALF = math.exp(-0.5) - 0.5  # 0.10653...
EXPECTED = {
    "k1": [[-0.05, 0.0, 0.95], [0.5, 0.0, 0.2]],
    "k2": [[-0.0125, 0.0, 0.9875], [0.5, 0.0, -0.2]],
    "k3": [[-0.1 * K3_HALF, 0.0, 1.0 - 0.1 * K3_HALF], [0.5, 0.0, -0.1 * (math.exp(2.0) - 3.0)]],
}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalised_rewards_by_hand(estimator):
    """r'_t = r_t - beta * KL_t on action tokens; r'_t = r_t elsewhere."""
    out = kl_penalised_rewards(REWARDS, LOGP_OLD, LOGP_REF, ACTIONS, kl_coef=0.1, estimator=estimator)
    torch.testing.assert_close(out, torch.tensor(EXPECTED[estimator]), atol=1e-6, rtol=0)
    assert out[1, 1] == REWARDS[1, 1]  # not an action: no penalty though its KL is not 0


def test_kl_penalised_rewards_leave_the_inputs_alone():
    before = REWARDS.clone()
    kl_penalised_rewards(REWARDS, LOGP_OLD, LOGP_REF, ACTIONS, kl_coef=0.1, estimator="k1")
    assert torch.equal(REWARDS, before)


def test_trainer_with_kl_in_reward_gives_the_advantages_the_penalised_rewards(tmp_path, tiny_model, tokenizer,
                                                                              prompts_dataset):
    """The second iteration (pi_old has moved away from pi_ref by then): batch.kl_penalised_rewards are
    the per-token rewards the function returned (batch.token_rewards, untouched) minus
    kl_coef * k1(logp_old, logp_ref) on the actions, and with no baseline, no normalisation and no
    reward-to-go each advantage is its row's penalised return."""
    a = tokenizer.convert_tokens_to_ids("a")
    returned = []

    def per_token(prompts, completions, completion_ids, **kw):
        rewards = [[1.0 if t == a else 0.1 * (k + 1) for k, t in enumerate(ids)] for ids in completion_ids]
        returned.append(rewards)
        return rewards

    config = small_config(tmp_path, kl_coef=0.1, kl_in="reward", kl_estimator="k1", baseline="none",
                          adv_norm="none", reward_to_go=False, learning_rate=1e-2)
    trainer = PGTrainer(tiny_model, [per_token], prompts_dataset, config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    trainer.step()
    batch = trainer.step().batch
    B, T = batch.completion_ids.shape
    scored = torch.zeros(B, T)
    for i, rewards in enumerate(returned[-1]):
        scored[i, :len(rewards)] = torch.tensor(rewards)
    kl = torch.where(batch.action_mask, batch.logp_old - batch.logp_ref, 0.0)  # k1
    assert kl.abs().max() > 0.01  # the policy has moved: the penalty is not 0
    expected = scored - 0.1 * kl
    torch.testing.assert_close(batch.kl_penalised_rewards, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.token_rewards, scored, atol=0, rtol=0)  # the task's rewards stay
    m = batch.loss_mask
    row_return = (expected * batch.action_mask).sum(1, keepdim=True).expand(B, T)
    torch.testing.assert_close(batch.adv[m], row_return[m], atol=1e-5, rtol=0)


def test_kl_in_reward_logs_the_task_reward_and_the_penalised_reward_apart(tmp_path, tiny_model, tokenizer,
                                                                           prompts_dataset):
    """Issue 23: with kl_in=reward, reward_mean / reward_std in metrics.jsonl are the task's reward (the
    reward function on the completions samples.jsonl logged, recomputed here), as without KL; the
    penalised return R_i - kl_coef * sum_t KL_t, what the advantages see, is logged apart as
    kl_penalised_reward_mean / _std; the two means differ by kl_coef times the mean summed KL."""
    kl_coef = 0.5
    config = small_config(tmp_path, kl_coef=kl_coef, kl_in="reward", kl_estimator="k1", learning_rate=1e-2)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    trainer.step()
    batch = trainer.step().batch  # iteration 2: pi_old has moved away from pi_ref
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    samples = [s for s in read_jsonl(tmp_path / "run" / "samples.jsonl") if s["iteration"] == 2]
    assert len(samples) == batch.batch_size == 8

    task = torch.tensor(count_a(None, [s["completion"] for s in samples]), dtype=torch.float64)
    assert logged["reward_mean"] == pytest.approx(float(task.mean()), abs=1e-7)
    assert logged["reward_std"] == pytest.approx(float(task.std(unbiased=False)), abs=1e-7)
    assert [s["reward"] for s in samples] == pytest.approx(task.tolist(), abs=1e-7)  # per sample, too

    kl_sum = torch.where(batch.action_mask, batch.logp_old - batch.logp_ref, 0.0).sum(1).double()  # k1, (B,)
    assert kl_sum.abs().mean() > 0.01  # the penalty is not 0: the two figures must differ
    penalised = torch.tensor(count_a(None, batch.completions), dtype=torch.float64) - kl_coef * kl_sum
    assert logged["kl_penalised_reward_mean"] == pytest.approx(float(penalised.mean()), abs=1e-6)
    assert logged["kl_penalised_reward_std"] == pytest.approx(float(penalised.std(unbiased=False)), abs=1e-6)
    assert logged["reward_mean"] - logged["kl_penalised_reward_mean"] == \
        pytest.approx(kl_coef * float(kl_sum.mean()), abs=1e-6)

"""Batched multi-turn episodes, token-in/token-out: the sampled tokens are the trained tokens."""

import json
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, trainers

from lmpg.advantages import returns, subtract_baseline
from lmpg.environments import EpisodeEnv
from lmpg.episodes import (ENDINGS, ChatBridge, EpisodeLimits, environment_token_rewards, episode_metrics,
                           sample_episodes)
from lmpg.errors import ConfigError
from lmpg.logprobs import sequence_logprobs
from lmpg.losses import policy_gradient_loss
from lmpg.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, make_char_tokenizer, make_tiny_causal_lm


class CountingGame:
    """A step-API game: the observation is the turn number, a reward of 0.5 per turn, done after 3."""

    def reset(self, **row):
        self.turn = 0
        return ":"

    def step(self, action):
        self.turn += 1
        return f"[{self.turn}]", 0.5, self.turn == 3


def eos_biased(model, tokenizer, bias=3.0):
    """The model with +bias on the EOS logit, so that random weights end their turns quickly."""
    def hook(module, inputs, output):
        out = output.clone()
        out[..., tokenizer.eos_token_id] += bias
        return out
    model.lm_head.register_forward_hook(hook)
    return model


def bpe_tokenizer():
    """A BPE tokenizer trained in-process: merges make decode-then-encode differ from the sampled ids."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    corpus = ["abab ab ba 12 21 123 [1] [2] [3] :" * 3, "aabb abba 1212 [12] ab12"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=list(SPECIAL_TOKENS),
                                                            initial_alphabet=list("ab12[]: 3")))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                               bos_token="<bos>", unk_token="<unk>", padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def run(model, tok, env_cls=CountingGame, carry=True, G=2, prompts=("ab", "ba"), limits=EpisodeLimits(3, 5),
        tool_format="simple", seeds=None):
    B = len(prompts) * G
    return sample_episodes(model, tok, list(prompts), [{}] * len(prompts), lambda: EpisodeEnv(env_cls(), tool_format),
                           G, seeds=seeds or list(range(100, 100 + B)), env_seeds=list(range(len(prompts))),
                           limits=limits, eos_ids=[tok.eos_token_id], carry_cache=carry)


@pytest.fixture(scope="module")
def char_setup():
    tok = make_char_tokenizer("ab12[]:3")
    return eos_biased(make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0), tok), tok


def test_environment_tokens_are_holes_in_the_action_mask(char_setup):
    model, tok = char_setup
    batch = run(model, tok)
    bridge = ChatBridge(tok, "user")
    for i, ep in enumerate(batch.episodes):
        ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        act = batch.action_mask[i][batch.completion_mask[i]].tolist()
        env_ids = [t for t, a in zip(ids, act) if not a]
        observations = [m["content"] for m in ep.messages if m["role"] == "user"]
        assert env_ids == sum((bridge.ids(o) for o in observations), [])
        assert ep.turns == len([m for m in ep.messages if m["role"] == "assistant"])
        if not ep.truncated:
            assert ep.turns == 3 and [r for _, r in ep.rewards] == [0.5] * 3
            # each reward on the last token (the EOS) of its turn
            for pos, _ in ep.rewards:
                assert batch.action_mask[i, pos] and int(batch.completion_ids[i, pos]) == tok.eos_token_id
    assert (batch.action_mask & ~batch.completion_mask).sum() == 0
    assert sum(not e.truncated for e in batch.episodes) >= 2  # the test sees whole episodes
    assert episode_metrics(batch.episodes)["turns_max"] == 3


def test_cache_across_turns_samples_what_a_full_prefill_samples(char_setup):
    model, tok = char_setup
    a, b = run(model, tok, carry=True), run(model, tok, carry=False)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.action_mask, b.action_mask)
    torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=0, atol=1e-5)


def test_bpe_update_logprobs_equal_the_samplers_and_retokenising_breaks_them():
    """With a BPE tokenizer (decode-then-encode is not the identity) the update's forward gives every
    action token the sampler's log-prob (to float rounding); re-tokenising the history from its
    text changes the tokens, and the log-probs of the policy's turns with them."""
    tok = bpe_tokenizer()
    model = eos_biased(make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=1), tok, bias=2.0)
    batch = run(model, tok, G=4, limits=EpisodeLimits(3, 6))
    logp, _ = sequence_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                batch.completion_mask)
    diff = (logp - batch.sampler_logp).abs()[batch.action_mask]
    assert float(diff.max().detach()) < 1e-5
    # re-tokenise each history from its text (special tokens kept) and compare
    changed = 0
    for i in range(batch.batch_size):
        ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
        again = tok.encode(tok.decode(ids), add_special_tokens=False)
        changed += again != ids
    assert changed >= 1, "the BPE merges must make at least one history re-tokenise differently"
    # the policy's own first turn, re-tokenised, is no longer what it sampled: its log-prob moves
    i = next(i for i in range(batch.batch_size)
             if tok.encode(tok.decode(batch.completion_ids[i][batch.completion_mask[i]].tolist()),
                           add_special_tokens=False) != batch.completion_ids[i][batch.completion_mask[i]].tolist())
    ids = batch.completion_ids[i][batch.completion_mask[i]].tolist()
    again = torch.tensor([tok.encode(tok.decode(ids), add_special_tokens=False)])
    relogp, _ = sequence_logprobs(model, batch.prompt_ids[i:i + 1], batch.prompt_mask[i:i + 1], again,
                                  torch.ones_like(again, dtype=torch.bool))
    assert abs(float(relogp.sum()) - float(batch.sampler_logp[i][batch.action_mask[i]].sum())) > 0.1


def test_environment_tokens_and_padding_never_contribute(char_setup):
    model, tok = char_setup
    batch = run(model, tok)
    r, has = environment_token_rewards(batch)
    ret = returns(r, batch.action_mask, reward_to_go=True, turn_ids=batch.turn_ids)
    adv, _ = subtract_baseline(ret, batch.action_mask, group_size=2, kind="leave_one_out")
    assert bool((adv[~batch.action_mask] == 0).all())
    logp = batch.sampler_logp.clone().requires_grad_(True)
    loss, _ = policy_gradient_loss(logp, batch.sampler_logp, adv, batch.action_mask, loss_agg="sequence_sum")
    (grad,) = torch.autograd.grad(loss, logp)
    assert bool((grad[~batch.action_mask] == 0).all()) and bool((grad[batch.action_mask] != 0).any())


@pytest.mark.parametrize("ratio_level", ["sequence", "sequence_mean"])
def test_sequence_level_ratios_use_action_tokens_only(char_setup, ratio_level):
    """The update's loss takes batch.loss_mask (action tokens of scored rows, lmpg.update): the log-probs
    at the environment's tokens change neither the sequence ratio nor the loss."""
    from lmpg.losses import importance_ratio

    model, tok = char_setup
    batch = run(model, tok)
    env_tokens = batch.completion_mask & ~batch.action_mask
    assert env_tokens.any()
    old = batch.sampler_logp
    new = old + 0.05 * batch.action_mask.float()
    noisy = new + 3.0 * env_tokens.float()  # what an environment token's log-prob would add
    adv = torch.ones_like(old)
    torch.testing.assert_close(importance_ratio(noisy, old, batch.loss_mask, ratio_level),
                               importance_ratio(new, old, batch.loss_mask, ratio_level), rtol=0, atol=0)
    losses = [policy_gradient_loss(lp, old, adv, batch.loss_mask, ratio_level=ratio_level)[0] for lp in (new, noisy)]
    assert torch.equal(*losses)
    assert not torch.equal(importance_ratio(noisy, old, batch.completion_mask, ratio_level),
                           importance_ratio(new, old, batch.completion_mask, ratio_level))


class RandomStart:
    """reset draws its task from Python's random, as TRL's documentation writes it."""

    def reset(self, **row):
        self.target = random.randint(0, 10**6)
        return f":{self.target % 3}"

    def step(self, action):
        return None, float(self.target % 7), True


def test_a_groups_episodes_start_from_the_same_state(char_setup):
    model, tok = char_setup
    batch = run(model, tok, env_cls=RandomStart, G=3, prompts=("a", "a", "a", "a"))
    starts = [tuple(batch.prompt_ids[i][batch.prompt_mask[i]].tolist()) for i in range(batch.batch_size)]
    rewards = [ep.rewards[0][1] for ep in batch.episodes if ep.rewards]
    for g in range(4):
        assert len(set(starts[3 * g:3 * g + 3])) == 1
    assert len(set(starts)) > 1 or len(set(rewards)) > 1  # different groups, different seeds
    again = run(model, tok, env_cls=RandomStart, G=3, prompts=("a", "a", "a", "a"))
    assert torch.equal(again.prompt_ids, batch.prompt_ids)  # reproducible


def test_limits_truncate_and_are_counted(char_setup):
    model, tok = char_setup
    batch = run(model, tok, limits=EpisodeLimits(max_turns=2, max_new_tokens=5))  # the game needs 3 turns
    assert all(ep.truncated for ep in batch.episodes)
    assert bool(batch.truncated.all()) and episode_metrics(batch.episodes)["truncated_episodes"] == 4
    short = run(model, tok, limits=EpisodeLimits(max_turns=3, max_new_tokens=5, max_episode_tokens=4))
    assert all(ep.truncated for ep in short.episodes)
    assert int(short.completion_mask.sum(1).max()) <= 4


CHATML = (
    "{%- if tools %}<|im_start|>system\ntools{{ tools | length }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_chat_bridge_of_a_chatml_template():
    tok = make_char_tokenizer("abcdefghijklmnopqrstuvwxyz_<>|/\n0123456789")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    bridge = ChatBridge(tok, "tool")
    # (the template's `{%-` strips the newlines between blocks)
    assert tok.decode(bridge.ids("42")) == "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>" \
                                           "<|im_start|>assistant"
    tok.chat_template = CHATML.replace("{{ m.content }}<|im_end|>", "{{ m.content if loop.last else '' }}<|im_end|>")
    with pytest.raises(ConfigError, match="rewrites earlier turns"):
        ChatBridge(tok, "tool")


GAME_FILE = '''
class CountingGame:
    def reset(self, **row):
        self.turn = 0
        return ":"

    def step(self, action):
        self.turn += 1
        return f"[{self.turn}]", float(action.count("a")) / 4, self.turn == 2
'''


def test_trainer_runs_episodes_with_metrics_and_turn_by_turn_samples(tmp_path, tiny_model, tokenizer, prompts_dataset):
    import json

    from conftest import small_config
    from lmpg import PGTrainer

    game = tmp_path / "game.py"
    game.write_text(GAME_FILE)
    config = small_config(tmp_path, environment=f"{game}:CountingGame", max_turns=3, max_new_tokens=4,
                          reward_to_go=True, gamma=0.5, baseline="leave_one_out", epochs_per_batch=2,
                          minibatch_size=4)
    metrics = PGTrainer(tiny_model, None, prompts_dataset, config, tokenizer=tokenizer).train()
    assert len(metrics) == 2
    for m in metrics:
        assert 1 <= m["turns_mean"] <= m["turns_max"] <= 2 and "truncated_episodes" in m
        assert m["ratio_max"] < 2.0  # two epochs at lr 3e-3 on a tiny model: moved, not blown up
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["turns"][0]["role"] == "assistant"
    timings = [json.loads(line) for line in (tmp_path / "run" / "timings.jsonl").read_text().splitlines()]
    assert all(t["time_env"] <= t["time_sample"] for t in timings)


def test_evaluate_and_cli_sample_run_episodes(tmp_path, tiny_model, tokenizer, capsys):
    from lmpg.cli import main
    from lmpg.evaluate import evaluate

    game = tmp_path / "game.py"
    game.write_text(GAME_FILE)
    data = [{"prompt": "1+1="}, {"prompt": "2+2="}]
    result = evaluate(tiny_model, tokenizer, data, [], n=2, max_new_tokens=4, environment=f"{game}:CountingGame",
                      max_turns=3, return_samples=True)
    assert 1 <= result["turns_mean"] <= 2 and result["samples"][0]["turns"][0]["role"] == "assistant"
    tiny_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["sample", str(tmp_path / "model"), "1+1=", "--n", "2", "--max-new-tokens", "4",
                 "--environment", f"{game}:CountingGame"]) == 0
    assert "assistant:" in capsys.readouterr().out
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    assert main(["eval", str(tmp_path / "model"), str(tmp_path / "data.jsonl"), "--n", "2", "--max-new-tokens", "4",
                 "--environment", f"{game}:CountingGame", "--max-turns", "3", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert 1 <= evaluated["turns_mean"] <= 2 and evaluated["samples_per_prompt"] == 2


def test_cli_trains_with_an_environment_from_yaml(tmp_path, tiny_model, tokenizer):
    """`environment: file.py:Class` in a YAML config, as a CLI user writes it; no reward functions."""
    import yaml

    from lmpg.cli import main

    game = tmp_path / "game.py"
    game.write_text(GAME_FILE)
    tiny_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(4)))
    config = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"),
              "environment": f"{game}:CountingGame", "max_turns": 3, "output_dir": str(tmp_path / "run"),
              "iterations": 1, "batch_size": 8, "group_size": 2, "max_new_tokens": 4, "progress_bar": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= metrics["turns_mean"] <= metrics["turns_max"] <= 2 and "tool_calls_per_episode" in metrics


class ScriptedSampler:
    """A TurnSampler that writes fixed turns and records what it was given: the loop's contract
    with any sampler (lmpg.generation), a vLLM one included."""

    def __init__(self, turns):
        self.turns, self.calls, self.started, self.finished = turns, [], None, False

    def start(self, seeds):
        self.started = list(seeds)

    def sample(self, rows, histories, max_new_tokens):
        from lmpg.generation import SampledTurn

        self.calls.append((list(rows), [list(h) for h in histories], list(max_new_tokens)))
        turn = self.turns[len(self.calls) - 1]
        return [SampledTurn(turn[:n], [-0.5] * len(turn[:n])) for n in max_new_tokens]  # at most the budget

    def finish(self):
        self.finished = True


def test_any_turn_sampler_plugs_into_the_loop_with_whole_histories(char_setup):
    model, tok = char_setup
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    sampler = ScriptedSampler([[a, eos], [b, b, eos], [a, eos]])
    batch = sample_episodes(model, tok, ["ab", "ba"], [{}] * 2, lambda: EpisodeEnv(CountingGame(), "simple"), 2,
                            seeds=[7, 8, 9, 10], env_seeds=[0, 1], limits=EpisodeLimits(3, 5), eos_ids=[eos],
                            turn_sampler=sampler)
    assert sampler.started == [7, 8, 9, 10] and sampler.finished and len(sampler.calls) == 3
    bridge = ChatBridge(tok, "user")
    prompt_rows = [batch.prompt_ids[i][batch.prompt_mask[i]].tolist() for i in range(4)]
    rows, histories, budgets = sampler.calls[2]
    assert rows == [0, 1, 2, 3] and budgets == [5] * 4
    # the whole history: prompt (no padding), then every turn and observation so far
    assert histories[0] == prompt_rows[0] + [a, eos] + bridge.ids("[1]") + [b, b, eos] + bridge.ids("[2]")
    ids = batch.completion_ids[0][batch.completion_mask[0]].tolist()
    assert ids == histories[0][len(prompt_rows[0]):] + [a, eos]
    assert batch.sampler_logp[batch.action_mask].eq(-0.5).all() and batch.sampler_logp[~batch.action_mask].eq(0).all()
    assert [r for _, r in batch.episodes[0].rewards] == [0.5] * 3


def test_lmpg_turn_sampler_prefills_in_full_a_history_its_cache_does_not_hold(char_setup):
    """The KV-cache sampler on its own, call by call against one that prefills every history in
    full: an extended history is fed on the cache, one that does not extend it (another row's, an
    edited one) is prefilled in full; both sample the same tokens."""
    from lmpg.generation import LmpgTurnSampler

    model, tok = char_setup
    ids = tok.encode("ab", add_special_tokens=False)
    outputs = []
    for carry in (True, False):
        s = LmpgTurnSampler(model, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], carry_cache=carry)
        model.train()
        s.start([3, 4])
        assert not model.training
        first = s.sample([0, 1], [ids, ids], [4, 4])
        carried = s.sample([0, 1], [ids + first[0].token_ids + ids, ids + first[1].token_ids + ids], [4, 4])
        edited = s.sample([1], [ids + ids], [4])  # row 1's cache holds another history
        s.finish()
        assert model.training  # the mode it found is restored
        outputs.append([first, carried, edited])
    model.eval()
    for a, b in zip(*outputs):
        assert [t.token_ids for t in a] == [t.token_ids for t in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logp), torch.tensor(y.logp), rtol=0, atol=1e-5)


def calculator_episodes(turn_texts, chat, limits=EpisodeLimits(2, 12)):
    """Episodes of the calculator task (lmpg.tasks.calculator: tool add, simple format) whose policy
    writes `turn_texts`, one per turn, each ended by EOS; the prompt 12+34=, plain text or chat."""
    from lmpg.tasks import calculator

    tok = make_char_tokenizer(calculator.ALPHABET)
    tok.chat_template = calculator.CHAT_TEMPLATE
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2, seed=0)
    turns = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in turn_texts]
    prompt = [{"role": "user", "content": "12+34="}] if chat else "12+34="
    return sample_episodes(model, tok, [prompt], [{}], lambda: EpisodeEnv(calculator.Calculator(), "simple"), 1,
                           seeds=[0], env_seeds=[0], limits=limits, eos_ids=[tok.eos_token_id],
                           turn_sampler=ScriptedSampler(turns)), prompt


@pytest.mark.parametrize("doc", ["quickstart.md", "README.md", "rewards.md"])
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_the_docs_correct_reward_scores_the_policys_own_final_answer(doc, chat):
    """The docs' `correct` (`c if isinstance(c, str) else c[-1]["content"]`) on episodes: the policy
    calls add(12,34), reads 46 and answers 46: reward 1 for both prompt kinds (plain text used to get
    every turn run together, the tool's output included). An episode whose tool answer never reached
    the policy (no room left for it) ends on the policy's call, which is not the answer: reward 0
    (chat prompts used to end on the tool's message and reward the tool's answer)."""
    from pathlib import Path

    from lmpg.episodes import score_episodes
    from lmpg.rewards import RewardScorer
    from test_docs_quickstart import docs_correct

    path = Path(__file__).resolve().parents[1] / ("README.md" if doc == "README.md" else f"docs/{doc}")
    if doc == "rewards.md":  # its complete example: the whole my_rewards.py block, imports included
        namespace = {}
        exec(next(b for b in path.read_text().split("```python\n") if b.startswith('"""Rewards for a sums')).split(
            "```")[0], namespace)
        correct = namespace["correct"]
    else:
        correct = docs_correct(path)
    scorer = RewardScorer([correct])
    for limits, expected in [(EpisodeLimits(2, 12), 1.0), (EpisodeLimits(2, 12, max_episode_tokens=12), 0.0)]:
        batch, prompt = calculator_episodes(["add(12,34)", "46"], chat, limits)
        rewards, scored, _ = score_episodes(scorer, batch, [prompt], {"answer": ["46"]}, "prompt", 0)
        assert bool(scored[0]) and float(rewards.sum()) == expected, (limits, batch.episodes[0].messages)
    ep = batch.episodes[0]  # the second: the tool ran, its answer had no room
    assert ep.ended == "max_episode_tokens" and ep.tool_calls == 1 and ep.messages[-1]["role"] == "assistant"
    assert ep.transcript[-1] == {"role": "tool", "content": "46"}  # in the log, not in what the reward reads


def test_a_step_api_turn_cut_by_max_new_tokens_is_stepped_scored_and_counted(char_setup):
    """A game's turn that reaches max_new_tokens without EOS still reaches step() (its reward counts,
    the episode is scored) and ends the episode as `max_new_tokens`; one cut by the episode's token
    budget ends as `max_episode_tokens`: each counted apart from max_turns."""
    model, tok = char_setup
    a, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    sampler = ScriptedSampler([[a, eos], [a, a, a]])
    batch = sample_episodes(model, tok, ["ab"], [{}], lambda: EpisodeEnv(CountingGame(), "simple"), 1, seeds=[0],
                            env_seeds=[0], limits=EpisodeLimits(3, 3), eos_ids=[eos], turn_sampler=sampler)
    ep = batch.episodes[0]
    assert ep.turns == 2 and [r for _, r in ep.rewards] == [0.5, 0.5] and ep.ended == "max_new_tokens"
    assert ep.truncated and ep.transcript[-1] == {"role": "user", "content": "[2]"}
    r, has = environment_token_rewards(batch)
    assert bool(has[0]) and float(r.sum()) == 1.0
    sampler = ScriptedSampler([[a, eos], [a, a, a]])  # 2 + 3 (bridge-less observation) + 3 > 7: cut by the budget
    batch = sample_episodes(model, tok, ["ab"], [{}], lambda: EpisodeEnv(CountingGame(), "simple"), 1, seeds=[0],
                            env_seeds=[0], limits=EpisodeLimits(3, 3, max_episode_tokens=7), eos_ids=[eos],
                            turn_sampler=sampler)
    assert batch.episodes[0].ended == "max_episode_tokens" and batch.episodes[0].turns == 2
    m = episode_metrics(batch.episodes)
    assert m["episodes_ended/max_episode_tokens"] == 1 and m["episodes_ended/max_turns"] == 0


def test_why_episodes_end_is_counted_per_reason(char_setup):
    model, tok = char_setup
    batch = run(model, tok, limits=EpisodeLimits(max_turns=2, max_new_tokens=5))  # the game needs 3 turns
    m = episode_metrics(batch.episodes)
    assert sum(m[f"episodes_ended/{why}"] for why in ENDINGS) == 4
    assert m["episodes_ended/max_turns"] == sum(ep.ended == "max_turns" for ep in batch.episodes) >= 1
    whole = run(model, tok)
    assert {ep.ended for ep in whole.episodes if not ep.truncated} == {"done"}
    assert episode_metrics(whole.episodes)["episodes_ended/done"] >= 2


def test_a_sample_record_reads_the_episode_turn_by_turn(char_setup):
    """samples.jsonl's record of an episode: what reset returned, each action with its reward, each
    observation (the last one included, which the policy never read), why it ended; `completion` is
    the final answer, not the turns run together."""
    from lmpg.samples import completion_records

    model, tok = char_setup
    a, b, eos = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id
    batch = sample_episodes(model, tok, ["ab"], [{}], lambda: EpisodeEnv(CountingGame(), "simple"), 1, seeds=[0],
                            env_seeds=[0], limits=EpisodeLimits(3, 3), eos_ids=[eos],
                            turn_sampler=ScriptedSampler([[a, eos], [b, eos], [a, a, eos]]))
    batch.token_rewards, batch.scored = environment_token_rewards(batch)
    (record,) = completion_records(batch, ["ab"])
    assert record["reset"] == ":" and record["ended"] == "done" and record["completion"] == "aa"
    assert record["turns"] == [{"role": "assistant", "content": "a", "reward": 0.5}, {"role": "user", "content": "[1]"},
                               {"role": "assistant", "content": "b", "reward": 0.5}, {"role": "user", "content": "[2]"},
                               {"role": "assistant", "content": "aa", "reward": 0.5},
                               {"role": "user", "content": "[3]"}]
    assert record["reward"] == 1.5 and record["num_turns"] == 3


def test_chat_template_kwargs_reach_the_episode_prompt_and_the_bridge():
    """Issue 22: chat_template_kwargs (TRL's, e.g. enable_thinking) go to apply_chat_template for an
    episode's prompt and for the bridge tokens around the environment's messages."""
    from lmpg.episodes import render_episode_prompt

    tok = make_char_tokenizer("abcdefghijklmnopqrstuvwxyz_<>|/\n0123456789")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML.replace("<|im_start|>assistant\n{%- endif %}",
                                       "<|im_start|>assistant\n{%- if not thinking %}nothink{% endif %}{%- endif %}")
    prompt = [{"role": "user", "content": "q"}]
    # (the template's `{%-` strips the newline after "assistant")
    assert render_episode_prompt(tok, prompt, None, None, {"thinking": False})[0].endswith("assistantnothink")
    assert render_episode_prompt(tok, prompt, None, None, {"thinking": True})[0].endswith("assistant")
    assert tok.decode(ChatBridge(tok, "tool", chat_template_kwargs={"thinking": False}).ids("42")).endswith("nothink")
    assert not tok.decode(ChatBridge(tok, "tool", chat_template_kwargs={"thinking": True}).ids("42")).endswith("nothink")

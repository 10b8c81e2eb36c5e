"""lmpg.tasks.addition: problems, the reversed format, the careless demonstrator, reward, accuracy."""

import pytest
import torch

from lmpg.tasks.addition import (
    AdditionProblem,
    accuracy,
    column_sum,
    demonstrator_accuracy,
    demonstrator_answer,
    exact_answer_reward,
    has_units_carry,
    make_problems,
    problem_columns,
    reversed_digits,
    sample_demonstrations,
)


def test_format_is_the_sum_as_written_and_the_answer_reversed():
    problem = AdditionProblem(123, 459)
    assert problem.prompt == "123+459="
    assert problem.answer == "285"  # 582
    assert AdditionProblem(999, 1).answer == "0001"
    assert [reversed_digits(n) for n in (0, 7, 10, 582)] == ["0", "7", "01", "285"]


def test_column_sum_is_addition():
    for a in range(0, 250, 7):
        for b in range(0, 1200, 13):
            assert column_sum(a, b) == reversed_digits(a + b)


@pytest.mark.parametrize("a, b, forgetful, careful", [
    (18, 5, "31", "32"),       # 13 instead of 23
    (123, 459, "275", "285"),  # 572 instead of 582
    (15, 25, "03", "04"),      # 30 instead of 40
    (999, 1, "099", "0001"),   # 990 instead of 1000: the lost carry would have rippled
    (11, 22, "33", "33"),      # no units carry, nothing to forget
])
def test_demonstrator_on_literal_cases(a, b, forgetful, careful):
    assert demonstrator_answer(a, b, forgets_carry=True) == forgetful
    assert demonstrator_answer(a, b, forgets_carry=False) == careful


def test_forgetting_the_units_carry_is_exactly_ten_less():
    for a in range(10, 100):
        for b in range(10, 100):
            units_carry = a % 10 + b % 10 >= 10
            assert has_units_carry(AdditionProblem(a, b)) == units_carry
            assert demonstrator_answer(a, b, forgets_carry=True) == reversed_digits(a + b - 10 * units_carry)


def test_sampled_demonstrations_forget_at_the_given_rate_and_are_seeded():
    problems = [AdditionProblem(18, 5)] * 2000  # always a units carry
    demonstrations = sample_demonstrations(problems, forget_probability=0.8, seed=0)
    assert set(demonstrations) == {"31", "32"}
    assert abs(demonstrations.count("31") / 2000 - 0.8) < 0.03
    assert demonstrations == sample_demonstrations(problems, forget_probability=0.8, seed=0)
    assert demonstrations != sample_demonstrations(problems, forget_probability=0.8, seed=1)


def test_demonstrator_accuracy_by_hand():
    # two problems without a units carry, two with
    problems = [AdditionProblem(11, 22), AdditionProblem(20, 30), AdditionProblem(18, 15), AdditionProblem(19, 19)]
    assert demonstrator_accuracy(problems, greedy=True, forget_probability=0.8) == 0.5
    assert demonstrator_accuracy(problems, greedy=False, forget_probability=0.8) == pytest.approx(0.5 + 0.5 * 0.2)
    assert demonstrator_accuracy(problems, greedy=True, forget_probability=0.3) == 1.0


def test_problems_are_disjoint_in_either_order_have_n_digits_and_are_seeded():
    train, heldout = make_problems(3000, 500, n_digits=2, seed=0)
    assert len(train) == 3000 and len(heldout) == 500
    trained = {(p.a, p.b) for p in train} | {(p.b, p.a) for p in train}
    assert not any((p.a, p.b) in trained for p in heldout)
    assert all(10 <= x <= 99 for p in train + heldout for x in (p.a, p.b))
    assert make_problems(3000, 500, n_digits=2, seed=0) == (train, heldout)
    assert make_problems(3000, 500, n_digits=2, seed=1) != (train, heldout)
    with pytest.raises(ValueError, match="lower n_train"):
        make_problems(4000, 100, n_digits=2, seed=0)  # 4095 unordered pairs


def test_problem_columns():
    columns = problem_columns([AdditionProblem(123, 459), AdditionProblem(18, 5)])
    assert columns == {"prompt": ["123+459=", "18+5="], "answer": ["285", "32"]}


def test_exact_answer_reward_on_literal_strings():
    completions = ["285", " 285\n", "2850", "582", "", "28 5"]
    rewards = exact_answer_reward(["123+459="] * 6, completions, answer=["285"] * 6, other_column=[0] * 6)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_exact_answer_reward_reads_chat_completions():
    completions = [[{"role": "assistant", "content": "32"}], [{"role": "assistant", "content": "31"}]]
    assert exact_answer_reward(None, completions, answer=["32", "32"]) == [1.0, 0.0]


class ScriptedModel(torch.nn.Module):
    """A stand-in policy whose `generate` appends a fixed completion per prompt (then EOS, then pad)."""

    def __init__(self, tokenizer, completion_for_prompt):
        super().__init__()
        self.tokenizer, self.completion_for_prompt = tokenizer, completion_for_prompt

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m])
            new = self.tokenizer(self.completion_for_prompt[prompt])["input_ids"] + [self.tokenizer.eos_token_id]
            new = (new + [self.tokenizer.pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_accuracy_counts_exact_completions():
    from lmpg.tiny import make_char_tokenizer

    tokenizer = make_char_tokenizer("0123456789+=")
    problems = [AdditionProblem(123, 459), AdditionProblem(18, 5), AdditionProblem(99, 1), AdditionProblem(10, 10)]
    # right, forgot the carry, right with a leading-digit carry (4 new tokens incl. EOS), right
    scripted = {"123+459=": "285", "18+5=": "31", "99+1=": "001", "10+10=": "02"}
    model = ScriptedModel(tokenizer, scripted).train()
    assert accuracy(model, tokenizer, problems, greedy=True, batch_size=3) == 0.75
    assert model.training  # mode restored


def test_accuracy_runs_a_real_model_greedy_and_sampled():
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2)
    problems, _ = make_problems(20, 0, n_digits=2, seed=0)
    greedy = accuracy(model, tokenizer, problems, greedy=True, batch_size=8)
    sampled = [accuracy(model, tokenizer, problems, greedy=False, batch_size=8, seed=3) for _ in range(2)]
    assert 0.0 <= greedy <= 1.0 and sampled[0] == sampled[1]

"""lmpg.tasks.addition: problems, the reversed format, the careless demonstrator; the recipe's held-out
accuracy through the library (lmpg.evaluate with reward_fns' exact_match)."""

import sys
from pathlib import Path

import pytest
import torch

from lmpg.tasks.addition import (
    AdditionProblem,
    column_sum,
    demonstrator_accuracy,
    demonstrator_answer,
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


def test_exact_match_reward_scores_reversed_answers(tmp_path):
    """The recipe's reward is reward_fns' exact_match on the `answer` column of problem_columns."""
    from reward_fns import exact_match

    columns = problem_columns([AdditionProblem(123, 459)] * 6)
    completions = ["285", " 285\n", "2850", "582", "", "28 5"]
    assert exact_match(columns["prompt"], completions, answer=columns["answer"]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "285"}], [{"role": "assistant", "content": "275"}]]
    assert exact_match(None, chat, answer=["285", "285"]) == [1.0, 0.0]


def test_recipe_accuracy_of_a_policy_that_memorised_the_forgetful_demonstrator():
    """Hand-worked: a policy that memorised the demonstrator's carry-forgetting answers is right
    exactly on the problems without a units carry, half of these, greedy and sampled alike."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from addition_cpu import ALPHABET, measure

    from lmpg.sft import imitation_warm_start
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tokenizer = make_char_tokenizer(ALPHABET)
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    pairs = [(18, 5), (27, 36), (11, 22), (40, 15), (19, 19), (23, 41), (55, 55), (30, 60)]
    problems = [AdditionProblem(a, b) for a, b in pairs]
    assert sum(map(has_units_carry, problems)) == 4
    demonstrations = [demonstrator_answer(p.a, p.b, forgets_carry=True) for p in problems]
    stats = imitation_warm_start(model, tokenizer, [p.prompt for p in problems], demonstrations, steps=120,
                                 batch_size=8, lr=1e-2)
    assert stats["loss_last"] < 0.05
    model.train()
    assert measure(model, tokenizer, problems, batch_size=3, seed=0) == {"greedy": 0.5, "sampled": 0.5}
    assert model.training  # mode restored

"""lmpg.tasks.calculator: the final-answer reward on literal episodes."""

from lmpg.tasks.calculator import sum_reward


def test_sum_reward_reads_the_last_assistant_message():
    tool_episode = [{"role": "assistant", "content": "add(47,85)"}, {"role": "tool", "content": "132"},
                    {"role": "assistant", "content": " 132\n"}]
    cut_after_the_tool = tool_episode[:2]  # the tool's answer is not the policy's
    head = [{"role": "assistant", "content": "122"}]
    completions = [tool_episode, cut_after_the_tool, head, "132", []]
    assert sum_reward(None, completions, ["132"] * 5) == [1.0, 0.0, 0.0, 1.0, 0.0]

"""PGConfig rejects combinations that would otherwise pass silently, with one line saying what to set."""

import pytest

from lmpg import PGConfig
from lmpg.errors import ConfigError


@pytest.mark.parametrize("values,match", [
    (dict(baseline="group_mean", group_size=1, batch_size=4), "group_size=1 makes every advantage 0"),
    (dict(logp_old_source="sampler", sampler="generate"), "logp_old_source=sampler needs sampler=lmpg"),
    (dict(loss_constant=8.0, loss_agg="token_mean"), "only applies to loss_agg=constant"),
    (dict(baseline="leave_one_out", group_size=1, batch_size=4), "leave_one_out needs group_size >= 2"),
])
def test_silent_combinations_are_refused_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        PGConfig(**values)
    assert "\n" not in str(err.value)


def test_valid_combinations_pass():
    PGConfig(baseline="batch_mean", group_size=1, batch_size=4)
    PGConfig(loss_agg="constant", loss_constant=8.0)

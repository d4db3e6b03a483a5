"""A CI-sized crash test: `ferret-fl run` killed with SIGKILL at three random moments,
resumed each time, ends with the uninterrupted run's weights and metrics bit for bit
(`make crash` places 20 kills)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from crash_resume import crash_and_resume  # noqa: E402


def test_kill_9_and_resume_three_times(tmp_path):
    result = crash_and_resume(kills=3, rounds=2, seed=1, workdir=str(tmp_path), log=lambda s: None)
    assert result["kills"] == 3
    assert result["weights_bitwise_equal"] and result["metrics_equal"]
    assert result["temporary_files_left"] == []

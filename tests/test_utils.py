"""utils: CtrlCBetweenSteps (where train.py lets a Ctrl-C land) and git_commit."""
import os
import signal
import subprocess
import time

import pytest

from utils import REPO, CtrlCBetweenSteps, git_commit


def test_ctrl_c_between_steps_waits_for_the_next_step_and_a_second_one_interrupts_at_once():
    seen, before = [], signal.getsignal(signal.SIGINT)
    with CtrlCBetweenSteps() as ctrl_c:
        with pytest.raises(KeyboardInterrupt):
            for step in ctrl_c.steps(range(5)):
                seen.append(step)
                if step == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                    seen.append("rest of step 1")  # the signal did not cut the step short
        assert seen == [0, 1, "rest of step 1"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here; the raise must not wait for a check()
    assert signal.getsignal(signal.SIGINT) is before  # put back on the way out


def test_git_commit_is_the_checkout_s_or_the_one_a_copy_is_told(monkeypatch):
    """A checkout answers its HEAD; a copy sent without its .git (the device machine's) is told by AGE_GENDER_COMMIT."""
    monkeypatch.delenv("AGE_GENDER_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert git_commit().removesuffix("+dirty") == head
    monkeypatch.setenv("AGE_GENDER_COMMIT", "abc123")
    assert git_commit() == "abc123"

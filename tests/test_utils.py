"""utils: CtrlCBetweenSteps (where train.py lets a Ctrl-C land), git_commit and map_ahead; every script's parser."""
import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from utils import REPO, CtrlCBetweenSteps, append_jsonl, git_commit, map_ahead, read_jsonl


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


SCRIPTS = ("bench", "bench_inference", "demo", "evaluate", "export", "pre_process", "reproduce", "serve", "synth_imdb",
           "train", "scripts/feed_speed", "scripts/gil_cost", "scripts/imdb_scale", "scripts/pre_process_speed")


def script_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script (SCRIPTS' spelling) builds, caught as it parses: nothing of the script runs after that."""
    seen = []

    def caught(parser, *args, **kwargs):
        seen.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(sys, "argv", [script])
    folder, _, name = script.rpartition("/")
    if folder:
        monkeypatch.syspath_prepend(str(REPO / folder))
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        module.parse_args([]) if hasattr(module, "parse_args") else module.main()
    monkeypatch.undo()
    assert len(seen) == 1, script
    return seen[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_abbreviated_options(script, monkeypatch):
    """An unknown option fails loudly: argparse would otherwise take `--work 4` for `--workers 4`, or a typo for the
    option it happens to begin."""
    assert script_parser(script, monkeypatch).allow_abbrev is False


def test_map_ahead_raises_a_failure_at_its_place_after_the_results_before_it():
    def inverse(i):
        return 1 / i

    with ThreadPoolExecutor(2) as pool:
        results = map_ahead(pool, inverse, [4, 2, 0, 1], ahead=2)
        assert [next(results), next(results)] == [0.25, 0.5]
        with pytest.raises(ZeroDivisionError):
            next(results)



def test_read_jsonl_leaves_out_an_unfinished_last_line(tmp_path):
    """append_jsonl ends every record with a newline; a line without one was cut short (a full disk): not a record,
    and no JSONDecodeError for --resume, which rewrites the log from it."""
    path = tmp_path / "metrics.jsonl"
    for epoch in (1, 2):
        append_jsonl(path, {"epoch": epoch})
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"epoch": 3, "age')
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]

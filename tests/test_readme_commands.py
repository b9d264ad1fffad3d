"""The README's first command, `make quickstart`, end to end in a temp folder: it must learn. And every option
the commands of the README and docs/ pass is one their script has."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_utils import SCRIPTS, script_parser
from utils import REPO, read_jsonl


def test_make_quickstart_learns_and_annotates(tmp_path):
    venv = Path(sys.executable).parent.parent  # the venv running the tests (make test made it, or its owner)
    # -o: the environment running the tests is used as it is; make would install requirements.txt's torch into one
    # it did not make (a GPU box's own torch, say)
    r = subprocess.run(["make", "quickstart", f"VENV={venv}", "-o", f"{venv}/.installed", f"QS_CROP={tmp_path}/crop",
                        f"QS_DATA={tmp_path}/data", f"QS_RUN={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    assert "make quickstart" in readme.split("```bash")[1]  # the README's first command is this one
    best = min(read_jsonl(tmp_path / "run" / "metrics.jsonl"), key=lambda m: m["score"])
    # measured 2026-12-07 (configs/quickstart.toml, 2 AVX2 cores): gender 100%, age MAE 2.53 on 1 thread, 2.66 on 2;
    # the 12 epochs of train.py's defaults before it: 2.29 (and 4.35 while the l1 loss was in units of 15 years)
    assert best["gender_acc"] >= 0.95 and best["age_mae"] <= 3.5, best
    assert "best: epoch" in r.stdout
    ev = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    # evaluate.py agrees with train.py: train validates in fp32 even where it trains under bf16 autocast
    assert abs(ev["metrics"]["age_mae"] - best["age_mae"]) < 1e-3
    assert ev["metrics"]["gender_acc"] == best["gender_acc"]
    assert (tmp_path / "run" / "best.onnx").is_file()  # the demo ran on the exported model
    results = json.loads((tmp_path / "run" / "demo" / "results.json").read_text())
    assert sorted(Path(e["image"]).name for e in results) == ["astronaut.jpg", "camera.jpg", "grace_hopper.jpg"]
    assert all(len(e["faces"]) == 1 for e in results)
    assert all((tmp_path / "run" / "demo" / Path(e["image"]).name).is_file() for e in results)


@pytest.mark.parametrize("doc,least", [("README.md", 40), ("docs/measurements.md", 3)])
def test_every_option_in_the_docs_commands_exists(monkeypatch, doc, least):
    """Each `python SCRIPT.py ...`, `torchrun ... SCRIPT.py ...` or inline `SCRIPT.py --option ...` of the README and
    docs/ passes only options SCRIPT has, spelled out (abbreviations are refused); what follows ` -- ` goes to another
    script."""
    text = (REPO / doc).read_text()
    found = re.findall(r"(?:(?:python3?|torchrun[^\n`]*?)\s+|(?<=`))((?:scripts/)?\w+)\.py([^\n`|]*)", text)
    commands = [(script, re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split(" -- ")[0])) for script, rest in found]
    commands = [(script, flags) for script, flags in commands if flags]  # a file named in passing passes none
    assert len(commands) >= least
    options = {script: set(script_parser(script, monkeypatch)._option_string_actions) for script in SCRIPTS}
    for script, flags in commands:
        assert set(flags) <= options[script], (script, flags)

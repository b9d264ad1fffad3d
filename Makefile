# `make quickstart` and `make test` are all the set-up a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QS_DATA := data/builtin_112
QS_RUN := runs/quickstart

.PHONY: venv test quickstart clean

venv: $(VENV)/.installed

# reinstall when requirements.txt changes
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

# the whole pipeline on the built-in dataset, on the CPU, in a few minutes
quickstart: venv
	$(PY) synth_imdb.py --out data/builtin_crop
	$(PY) pre_process.py --root data/builtin_crop --out $(QS_DATA) --size 112 --device cpu
	$(PY) train.py --data $(QS_DATA) --out $(QS_RUN) --pretrained none --device cpu
	$(PY) evaluate.py --checkpoint $(QS_RUN)/best.pt --data $(QS_DATA) --out $(QS_RUN)/eval --device cpu
	$(PY) demo.py --checkpoint $(QS_RUN)/best.pt --input images --output $(QS_RUN)/demo --device cpu

clean:
	rm -rf data/builtin_crop $(QS_DATA) $(QS_RUN)

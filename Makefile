# flowdiff: `make train` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline

.PHONY: install train test test-all lint bench classifier clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# these builds lie on the project's machines' disk; see README
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,robot]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) train.py $(ARGS)

# one pytest worker per core (pytest-xdist); a file's tests stay in one worker, so its module fixtures are built once
XDIST := -n auto --dist loadfile

test: install
	$(PY) -m pytest -m "not slow" -q $(XDIST) $(ARGS)

test-all: install
	$(PY) -m pytest -q $(XDIST) $(ARGS)

lint: install
	$(PY) -m ruff check src tests bench train.py sample.py
	$(PY) -m ruff format --check src tests bench train.py sample.py

# the MNIST digit classifier behind "classifier FID" (trained once, cached under ~/.cache/flowdiff/classifiers)
classifier: install
	$(PY) -m flowdiff.metrics.classifier $(ARGS)

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

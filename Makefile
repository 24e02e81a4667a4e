# Everything runs from the project's virtualenv; `make install` builds it from the pinned constraints (no GPU needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RESULTS ?= results/demo
# The demo's leaderboard (markdown, plots, figures, site): an ignored folder, so `make demo` never touches a
# committed file; `make leaderboards` regenerates the committed copy in leaderboards/ from the same records.
DEMO_BOARD ?= results/demo-leaderboards

# TORCH=cpu: torch and torchvision from PyTorch's CPU-only wheel index (about 2 GB of virtualenv instead of 6.5 GB of
# CUDA wheels; their dependencies then come from the usual index); the default wheels when that index cannot be
# reached. It applies when torch is not yet in $(VENV).
TORCH ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# -qq: pip prints its errors only (no build-backend warnings, no progress)
PIP_INSTALL := $(BIN)/python -m pip install -qq -c constraints.txt
# What install prints it will cost: the default measured (a fresh install on a busy 2-core machine), TORCH=cpu
# estimated from the wheels (the CPU torch wheel unpacks to 0.7 GB; torch's CUDA libraries and triton are 5.3 GB).
ifeq ($(TORCH),cpu)
INSTALL_COST := about 5 minutes and 2 GB (CPU-only torch)
PACKAGE_COST := about 3 minutes, 1.2 GB
else ifeq ($(TORCH),)
INSTALL_COST := about 9 minutes and 6.5 GB on a 2-core machine (TORCH=cpu: about 2 GB)
PACKAGE_COST := about 8 minutes; 6.5 GB, of which torch with its CUDA libraries is 5.3 GB
else
$(error TORCH=$(TORCH) is not an option: use TORCH=cpu for CPU-only torch wheels, or leave TORCH unset for the default)
endif

.PHONY: install demo leaderboards check test test-slow bench gpu-wheels gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "make install: into $(VENV), $(INSTALL_COST)"
	@echo "[1/5] virtualenv $(VENV) (seconds, 25 MB)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[2/5] upgrading pip (seconds, 10 MB)"
	@$(BIN)/python -m pip install -qq --upgrade pip
ifeq ($(TORCH),cpu)
	@echo "[3/5] torch + torchvision, CPU-only wheels from $(TORCH_CPU_INDEX) (about 1 minute, 0.7 GB)"
	@if v=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('torch'))" 2> /dev/null); then \
		echo "note: $(VENV) already has torch $$v: kept (make clean first for CPU-only wheels)"; \
	elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=15)" 2> /dev/null; then \
		$(PIP_INSTALL) --no-deps --index-url $(TORCH_CPU_INDEX) torch torchvision \
		&& echo "installed torch $$($(BIN)/python -c "import importlib.metadata as m; print(m.version('torch'))")"; \
	else \
		echo "note: $(TORCH_CPU_INDEX) cannot be reached from here: the default torch wheels (with CUDA, 6.5 GB in all) come in step 4"; \
	fi
else
	@echo "[3/5] torch + torchvision: the default wheels, with CUDA libraries, come in step 4 (TORCH=cpu: CPU-only wheels)"
endif
	@echo "[4/5] the package with every extra but crf (pseudo, slurm, site), its pinned dependencies and the test tools ($(PACKAGE_COST))"
	@$(PIP_INSTALL) -e ".[all,test]"
	@echo "[5/5] optional: pydensecrf2 for --crf (about 1 minute: built from source, needs a C++ compiler)"
	@$(PIP_INSTALL) -e ".[crf]" \
		|| echo "note: pydensecrf2 could not be built here; everything works except --crf"
	@touch $(STAMP)
	@echo "make install: done, $$(du -sh $(VENV) | cut -f1) in $(VENV)"

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

# `make test` leaves the tests marked `slow` (runs that are killed or race each other, a Slurm cluster, torchrun, the
# real DINOv2 of ../shared) to `make test-slow`; CI (.ci/run) runs both. -rs lists why each skipped test was skipped.
# Times: the slow tests took 4.6 minutes together on a quiet 2-core machine and about 21 file by file on a busy one
# (other sessions' tests on the same cores); the whole suite took about 10 and 43.
test: install
	@echo "make test: about 10 minutes on a quiet 2-core machine (about 20 on a busy one); skip reasons are listed at the end; the slow end-to-end tests are left to \`make test-slow\` (about 4 minutes, 20 busy)"
	$(BIN)/python -m pytest -q -rs -m "not slow"

test-slow: install
	@echo "make test-slow: the slow end-to-end tests, about 5 minutes on a quiet 2-core machine (about 20 on a busy one)"
	$(BIN)/python -m pytest -q -rs -m slow

bench: install
	$(BIN)/python benchmarks/bench_extraction.py
	$(BIN)/python benchmarks/bench_retrieval.py
	$(BIN)/python benchmarks/bench_api.py
	$(BIN)/python benchmarks/bench_kmeans.py
	$(BIN)/python benchmarks/bench_linear_dinov2.py --iterations 40

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
	$(BIN)/ruff check ssl_segbench tests benchmarks docs/examples

clean:
	rm -rf $(VENV) results .pytest_cache

# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create/refresh .venv idempotently (a stamp file records the installed requirements).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU machines get the CPU torch wheel first, so nothing later pulls a multi-GB CUDA build.
# GPU users: `make venv TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"` or
# install torch into .venv yourself before running make (an installed torch is kept).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast lint gpu-check system-packages clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: venv
	$(BIN)/python demo.py

# System packages for the Slurm tests (installed when root; see the script).
system-packages:
	bash tests/install_system_packages.sh

lint: venv
	$(BIN)/ruff check .

test: venv system-packages lint
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

# On a GPU machine: pretraining (bf16 ZeRO-2/3, kill + resume), finetuning, decoding and the
# benchmarks on CUDA, one JSON summary (tests/gpu/check.py). Without CUDA it says so and exits 0.
gpu-check: venv
	bash tests/gpu/check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs

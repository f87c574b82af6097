# The two set-up commands of the README: `make demo` (main job on bundled synthetic data) and `make test`.
# `make lint` runs ruff (pinned in constraints.txt, rules in pyproject.toml); CI runs it before the tests.
# Both create .venv on first use and install the pinned versions from constraints.txt.
# CUDA 12 clusters: `make install DALI_EXTRA=cuda12` installs the CUDA 12 DALI build instead.
VENV       ?= .venv
PY         := $(VENV)/bin/python
DALI_EXTRA ?= dali
PYTEST_ARGS ?=

.PHONY: install demo lint test test-slow test-multinode slurm-up slurm-down slurm-mn-up slurm-mn-down clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[$(DALI_EXTRA),test,bench]"
	# DeepSpeed JIT-compiles its CPU shared-memory op on first use (minutes on 2 busy cores); building it here keeps
	# that out of the first DeepSpeed test's time limit. It goes to TORCH_EXTENSIONS_DIR (default ~/.cache).
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
	    b = a().create_op_builder('ShareMemCommBuilder'); b.load(verbose=False) if b else None" \
	    || echo "note: DeepSpeed's CPU op did not build now; the first DeepSpeed run builds it"
	touch $@

demo: install
	$(VENV)/bin/tltrain demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Slow tests (multi-process training, SLURM): CI runs them after `make test`. slurm/env.sh points the SLURM
# clients at the local cluster of slurm/up.sh (the SLURM tests skip with a reason when it is not running).
test-slow: install
	bash -c 'source slurm/env.sh 2>/dev/null; exec $(VENV)/bin/pytest -m "(slow or slurm) and not multinode" $(PYTEST_ARGS)'

# Multi-node jobs on the two-node cluster of `slurm/up.sh --nodes 2` (state dir TLTRAIN_SLURM_MN_DIR, default
# /tmp/tltrain-slurm-mn); the tests point SLURM_CONF at it themselves and skip with a reason when it is down.
test-multinode: install
	$(VENV)/bin/pytest -m multinode $(PYTEST_ARGS) tests/test_slurm_multinode.py tests/test_pipeline_slurm.py

slurm-up:
	bash slurm/up.sh

slurm-down:
	bash slurm/down.sh

slurm-mn-up:
	bash slurm/up.sh --nodes 2

slurm-mn-down:
	bash slurm/down.sh --nodes 2

clean:
	rm -rf demo runs outputs multirun .pytest_cache

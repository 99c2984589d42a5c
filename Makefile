# Two entry points for a newcomer: `make demo` (the main job) and `make test` (the suite).
# Each installs what it needs into .venv: torch==2.13.0 first (the CPU wheel), then the
# project, then its `train` extra (DeepSpeed, pinned in pyproject.toml) built without build
# isolation against that torch, with its CPU shared-memory comm op compiled at install
# (DS_BUILD_SHM_COMM=1; --no-cache-dir so that a cached wheel built without it is not reused).
# Otherwise every process JIT-compiles the op under ~/.cache/torch_extensions behind a lock
# file: a process killed while it holds the lock (a worker killed mid-build) leaves it behind
# and every later DeepSpeed start waits on it forever.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The `train` extra's requirements (DeepSpeed) as pyproject.toml declares them.
TRAIN_EXTRA = $$(sed -n '/^train = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*"' | tr -d '"')
DS_INSTALL = DS_BUILD_SHM_COMM=1 $(BIN)/python -m pip install -q --no-cache-dir --no-build-isolation
# exits non-zero when the installed DeepSpeed lacks its prebuilt shm comm op (an older .venv)
HAS_SHM_OP = import sys; from deepspeed.git_version_info import installed_ops as ops; \
	sys.exit(not ops['deepspeed_shm_comm'])

.PHONY: install lint test demo demo-real bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(DS_INSTALL) $(TRAIN_EXTRA)
	$(BIN)/python -c "$(HAS_SHM_OP)" || $(DS_INSTALL) --no-deps --force-reinstall $(TRAIN_EXTRA)
	$(BIN)/python -c "$(HAS_SHM_OP)"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check ray_twist tests bench jobs
	$(BIN)/ruff format --check ray_twist tests bench jobs
	$(BIN)/mypy ray_twist

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure.
test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -rs tests

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/twist demo

# The real-text pipeline on ../shared/data/bible (see jobs/configs/bible_prepare.yaml): the
# base is built once (~30 min on 2 cores) and cached under runs/.
demo-real: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/twist demo --real

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/merge.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

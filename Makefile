# The set-up commands of the README. Each creates .venv if needed.
PYTHON ?= python3
VENV ?= .venv
# Use a staged copy of MNIST next to the checkout when there is one (this project's CI);
# otherwise the default data.root (./data) is used and MNIST is downloaded there.
ifneq ($(wildcard ../shared/data/MNIST/raw),)
export MNISTDIST_DATA_ROOT ?= $(abspath ../shared/data)
endif

# Every package of .venv, its exact version and the sha256 of each of its files, for Linux,
# macOS and Windows and Python >= 3.10 (docs/install.md). `make lock` rewrites it after a
# change to pyproject.toml's dependencies and keeps every other version; `make lock
# UPGRADE=1` moves all to their newest releases. Either needs uv (pip install uv).
LOCK = requirements-lock.txt
# torch and torchvision move only on purpose: the bitwise results were measured with these.
LOCK_PINS = torch==2.14.1 torchvision==0.29.1
UV ?= uv

.PHONY: install train test test-fast lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --no-deps -e .
	$(VENV)/bin/pip check
	touch $@

install: $(VENV)/.installed

train: install  ## install, then train configs/default.yaml on this machine
	$(VENV)/bin/python train_dist.py --config configs/default.yaml

test: install   ## install, then run the whole test suite (what CI runs)
	$(VENV)/bin/python -m pytest --durations=25

test-fast: install   ## install, then the fast tier (< 2 min): unit tests + in-process training on synthetic MNIST
	$(VENV)/bin/python -m pytest -m "not slow" --timeout 120

lock:   ## rewrite requirements-lock.txt from pyproject.toml (needs uv)
	printf '%s\n' $(LOCK_PINS) > $(LOCK).pins
	$(UV) pip compile pyproject.toml --extra test --universal --python-version 3.10 --generate-hashes \
		--constraint $(LOCK).pins --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) -o $(LOCK)
	rm -f $(LOCK).pins

clean:
	rm -rf runs wandb .pytest_cache

# The two set-up commands of the README. Each creates .venv if needed.
PYTHON ?= python3
VENV ?= .venv
# Use a staged copy of MNIST next to the checkout when there is one (this project's CI);
# otherwise the default data.root (./data) is used and MNIST is downloaded there.
ifneq ($(wildcard ../shared/data/MNIST/raw),)
export MNISTDIST_DATA_ROOT ?= $(abspath ../shared/data)
endif

.PHONY: install train test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install  ## install, then train configs/default.yaml on this machine
	$(VENV)/bin/python train_dist.py --config configs/default.yaml

test: install   ## install, then run the whole test suite (what CI runs)
	$(VENV)/bin/python -m pytest

test-fast: install   ## install, then the fast tier (< 2 min): unit tests + in-process training on synthetic MNIST
	$(VENV)/bin/python -m pytest -m "not slow" --timeout 120

clean:
	rm -rf runs wandb .pytest_cache

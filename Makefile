# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything (pinned torch for this environment).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[ray,sim,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(VENV)/bin/midtrain demo --run-dir runs/demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=egl $(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs

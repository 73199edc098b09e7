# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything (pinned torch for this environment).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: EGL/Mesa for offscreen MuJoCo rendering, Chromium for the report's browser test.
APT_PACKAGES := libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri chromium

.PHONY: install system-deps demo test bench clean

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[ray,sim,demo,dev]"
	touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(VENV)/bin/midtrain demo --run-dir runs/demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=egl $(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs

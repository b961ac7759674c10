# Two commands on a fresh machine: `make demo` and `make test` (both create .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
IMAGE_DEMO_OUT ?= outputs/image_gen_demo

.PHONY: venv demo image-demo test test-slow lint bench clean

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

clean:
	rm -rf $(VENV) outputs

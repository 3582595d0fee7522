"""Every experiment script runs offline with --tiny (a tiny model and ../shared/data). The training
scripts run in local mode (--num-workers 0: in this process, one Ray Train worker's numbers); the sweep
script's trials are Ray Train runs."""

import importlib
import math
import os
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def load(name):
    sys.path.insert(0, os.path.abspath(EXPERIMENTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo_qwen3_ultrafeedback", "mpo", "tool_calling", "dpo_vlm_rlaif_v"])
def test_training_scripts_run_tiny(ray_session, tmp_path, script):
    output = load(script).main(["--tiny", "--output-dir", str(tmp_path), "--max-steps", "2", "--num-workers", "0"])
    assert output.metrics["global_step"] == 2 and math.isfinite(output.metrics["loss"])
    assert (tmp_path / "config.json").is_file()


@pytest.mark.slow
def test_lora_script_saves_an_adapter(ray_session, tmp_path):
    output = load("dpo_qwen3_ultrafeedback").main(["--tiny", "--lora", "--output-dir", str(tmp_path),
                                                   "--max-steps", "2", "--num-workers", "0"])
    assert output.metrics["global_step"] == 2 and math.isfinite(output.metrics["loss"])
    assert (tmp_path / "adapter_config.json").is_file() and not (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_sweep_script_runs_tiny(ray_session, tmp_path):
    result = load("sweep_beta_loss").main(["--tiny", "--output-dir", str(tmp_path), "--max-steps", "2"])
    assert len(result.table) == 4 and result.best_model_dir
    assert {row["loss_type"] for row in result.table} == {"sigmoid", "ipo"}

"""The `make demo` path on the real SmolLM2-135M-Instruct, shortened to a few steps (slow)."""

import importlib.util
import math
import os

import pytest

DEMO = os.path.join(os.path.dirname(__file__), "..", "experiments", "demo.py")


@pytest.mark.slow
def test_demo_runs_on_real_smollm2(ray_session, tmp_path):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    result = demo.main(["--steps", "2", "--num-pairs", "20", "--max-length", "48",
                        "--output-dir", str(tmp_path)])
    assert result["train"]["global_step"] == 2
    assert all(math.isfinite(result["train"][k]) for k in ("loss", "grad_norm", "rewards/margins"))
    assert 0.0 <= result["after"]["reward_accuracy"] <= 1.0
    assert result["after"]["num_pairs"] == 4
    assert os.path.isfile(tmp_path / "model" / "config.json")

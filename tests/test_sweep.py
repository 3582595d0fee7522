"""Ray Tune sweeps over DPOConfig fields, and the report they leave behind."""

import csv
import os

import pytest
from ray import tune

from raydpo import DPOConfig
from raydpo.cli import main as cli
from raydpo.tune import search_space_from_dict, sweep


def test_search_space_from_yaml_form():
    space = search_space_from_dict({"beta": {"grid_search": [0.1, 0.5]}, "learning_rate": {"loguniform": [1e-6, 1e-4]},
                                    "loss_type": {"choice": ["sigmoid", ["sigmoid"]]}, "seed": 3})
    assert space["beta"] == {"grid_search": [0.1, 0.5]}
    assert 1e-6 <= space["learning_rate"].sample() <= 1e-4
    assert space["seed"] == 3
    with pytest.raises(ValueError, match="betta"):
        search_space_from_dict({"betta": {"grid_search": [0.1]}})
    with pytest.raises(ValueError, match="search_space.beta"):
        search_space_from_dict({"beta": {"grid_search": [0.1], "choice": [1]}})


def test_sweep_runs_trials_and_reports(ray_session, tiny_model, parity_rows, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = DPOConfig(output_dir=str(tmp_path), num_workers=1, max_steps=4, logging_steps=1, save_steps=2,
                     per_device_train_batch_size=8, learning_rate=1e-3, max_length=32, eval_strategy="steps",
                     eval_steps=2, report_to=["tensorboard", "mlflow"])
    # with an eval set the sweep metric defaults to eval_rewards/accuracies (max), logged at steps 2 and 4
    result = sweep(tiny_model, parity_rows[:64], {"beta": tune.grid_search([0.1, 0.5]),
                                                  "learning_rate": {"grid_search": [1e-3, 3e-3]}},
                   args=args, scheduler="asha", name="grid", max_concurrent_trials=2,
                   eval_dataset=parity_rows[200:216])
    assert len(result.table) == 4
    assert {(row["beta"], row["learning_rate"]) for row in result.table} == {
        (0.1, 1e-3), (0.1, 3e-3), (0.5, 1e-3), (0.5, 3e-3)}
    assert all(row["status"] == "ok" and row["loss"] is not None for row in result.table)
    metric = "eval_rewards/accuracies"
    best = max(row[metric] for row in result.table)
    assert result.best_config in [{"beta": r["beta"], "learning_rate": r["learning_rate"]}
                                  for r in result.table if r[metric] == best]
    with open(result.csv_path) as f:
        assert len(list(csv.DictReader(f))) == 4
    assert os.path.getsize(result.plot_path) > 1000
    # report_to=mlflow in a sweep: Tune's MLflowLoggerCallback, one run per trial with its config and metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{result.results_dir}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("raydpo").experiment_id])
    assert len(runs) == 4 and {float(r.data.params["beta"]) for r in runs} == {0.1, 0.5}
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) >= 2 for r in runs)
    # Tune's callback pointed this process's MLflow at the sweep's store; the sweep gave it back, so the
    # session's next run logs beside its own runs, not into this store (trackers.driver_mlflow_kept)
    import mlflow

    assert "MLFLOW_TRACKING_URI" not in os.environ and "grid" not in mlflow.get_tracking_uri()

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.best_model_dir)

    # `raydpo report` rebuilds the table and the plot from the saved results alone.
    os.remove(result.plot_path)
    capsys.readouterr()
    assert cli(["report", result.results_dir]) == 0
    assert "<- best" in capsys.readouterr().out and os.path.exists(result.plot_path)

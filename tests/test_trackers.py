"""The driver's tracker settings (raydpo/train/trackers.py), without Ray: what reaches the logging actor,
and what a sweep leaves behind in the driver for the session's next run."""

import os

import pytest

from raydpo.train.trackers import driver_mlflow_kept, report_targets, tracker_env


def test_report_to_names():
    assert report_targets("none") == report_targets(None) == report_targets([]) == []
    assert report_targets("all") == ["tensorboard", "mlflow", "wandb"]
    assert report_targets(["mlflow"]) == ["mlflow"]
    with pytest.raises(ValueError, match="unknown \\['mlfow'\\]"):
        report_targets(["mlfow"])


def test_the_actor_gets_the_drivers_mlflow_and_wandb_settings(monkeypatch):
    """MLFLOW_ALLOW_FILE_STORE included: without it MLflow 3 refuses, in the actor, the file store that the
    user allowed in the driver."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:/tmp/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = tracker_env()
    assert env["MLFLOW_TRACKING_URI"] == "file:/tmp/mlruns" and env["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert env["WANDB_MODE"] == "offline" and "UNRELATED_SECRET" not in env


@pytest.mark.parametrize("before", [None, "http://mlflow.example:5000"])
def test_a_sweep_gives_the_driver_its_mlflow_back(monkeypatch, before):
    """What Tune's MLflowLoggerCallback does in the driver (mlflow.set_tracking_uri, which also writes
    MLFLOW_TRACKING_URI into os.environ; the file-store opt-in) is undone when the sweep returns."""
    import mlflow

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    with driver_mlflow_kept():
        mlflow.set_tracking_uri("file:/tmp/sweep/mlruns")
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        assert os.environ["MLFLOW_TRACKING_URI"] == "file:/tmp/sweep/mlruns"  # what leaked before
    assert os.environ.get("MLFLOW_TRACKING_URI") == before and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert "sweep" not in mlflow.get_tracking_uri()
    if before is not None:
        assert mlflow.get_tracking_uri() == before

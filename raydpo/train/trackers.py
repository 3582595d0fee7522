"""Where the logged metrics go besides the returned history: `DPOConfig.report_to`, TRL's field.

- "tensorboard" (the default): event files in <storage_path>/<run_name>/tensorboard (with a URI
  storage_path, written to a local folder and uploaded there when the run ends);
- "mlflow": one MLflow run per training run (MLFLOW_TRACKING_URI, else <storage_path>/mlruns;
  MLFLOW_EXPERIMENT_NAME, else "raydpo"), with the config as parameters;
- "wandb": one Weights & Biases run (WANDB_PROJECT, else "raydpo"; WANDB_MODE=offline works without
  an account), with the config.

A training run logs from the driver's MetricsHistory actor, which sees every logged step of rank 0. A
sweep logs each trial through Ray Tune's own MLflowLoggerCallback / WandbLoggerCallback instead.
Metrics are named as transformers' integrations name them (its `rewrite_logs`): "loss" becomes
"train/loss" and "eval_loss" becomes "eval/loss".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import List

from raydpo import storage

TARGETS = ("tensorboard", "mlflow", "wandb")
# The driver's settings for the trackers, handed to the actor that logs (which may run elsewhere).
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE",
               "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL")


def report_targets(report_to) -> List[str]:
    """"all" / "none" / one name / a list -> the list of targets; an unknown name raises."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    if names in ([None], ["none"], []):
        return []
    if names == ["all"]:
        return list(TARGETS)
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise ValueError(f"DPOConfig.report_to: unknown {unknown}; use 'none', 'all' or some of {list(TARGETS)}")
    return names


def tracker_env() -> dict:
    return {name: os.environ[name] for name in TRACKER_ENV if name in os.environ}


def metric_name(name: str) -> str:
    """transformers' rewrite_logs: eval_<name> -> eval/<name>, anything else -> train/<name>."""
    return f"eval/{name[len('eval_'):]}" if name.startswith("eval_") else f"train/{name}"


class Trackers:
    """The run's open trackers; `log(metrics, step)` writes the numeric values to each."""

    def __init__(self, targets: List[str], run_dir: str, run_name: str, config: dict):
        self.tensorboard = self.mlflow_run = self.wandb_run = None
        self.run_dir = run_dir
        # TensorBoard and W&B write local files: with a URI storage_path, into a local folder first
        self.local_dir = tempfile.mkdtemp(prefix="raydpo-trackers-") if storage.is_uri(run_dir) else run_dir
        if "tensorboard" in targets:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.local_dir, "tensorboard"))
        if "mlflow" in targets:
            mlflow = _require("mlflow", "mlflow-skinny")

            mlflow.set_tracking_uri(mlflow_tracking_uri(os.path.dirname(run_dir)))
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "raydpo"))
            self.mlflow_run = mlflow.start_run(run_name=run_name)
            mlflow.log_params({key: str(value)[:500] for key, value in config.items()})
        if "wandb" in targets:
            wandb = _require("wandb", "wandb")

            os.makedirs(self.local_dir, exist_ok=True)
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "raydpo"), name=run_name, config=config,
                                        dir=os.environ.get("WANDB_DIR", self.local_dir), reinit="create_new")

    def log(self, metrics: dict, step: int):
        values = {metric_name(name): float(value) for name, value in metrics.items()
                  if isinstance(value, (int, float)) and name != "global_step"}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.mlflow_run is not None:
            import mlflow

            mlflow.log_metrics(values, step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            if self.local_dir != self.run_dir:
                storage.copy_dir(os.path.join(self.local_dir, "tensorboard"), storage.join(self.run_dir, "tensorboard"))
        if self.local_dir != self.run_dir and self.wandb_run is None:  # W&B's local files stay (WANDB_DIR)
            shutil.rmtree(self.local_dir, ignore_errors=True)
        if self.mlflow_run is not None:
            import mlflow

            mlflow.end_run()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def check_trackers_storage(report_to, storage_dir: str) -> None:
    """MLflow's default store is a local folder beside the runs: with a URI storage_path there is none."""
    if "mlflow" in report_targets(report_to) and storage.is_uri(storage_dir) and "MLFLOW_TRACKING_URI" not in os.environ:
        raise ValueError(f"DPOConfig.report_to includes 'mlflow' and storage_path is a URI ({storage_dir!r}): "
                         "set MLFLOW_TRACKING_URI to an MLflow server (its file store cannot live on a URI)")


def mlflow_tracking_uri(storage_dir: str) -> str:
    """MLFLOW_TRACKING_URI, else a file store beside the runs (MLflow 3 keeps it working only when asked)."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file:" + os.path.join(storage_dir, "mlruns")


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"DPOConfig.report_to={module!r} needs {package}: pip install {package} "
                          "(or raydpo[trackers])") from None


def tune_callbacks(targets: List[str], results_dir: str) -> list:
    """Ray Tune's logger callbacks for a sweep: one MLflow / W&B run per trial, its config included."""
    callbacks = []
    if "mlflow" in targets:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=mlflow_tracking_uri(results_dir),
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "raydpo"), save_artifact=False))
    if "wandb" in targets:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "raydpo"),
                                             dir=os.environ.get("WANDB_DIR", results_dir)))
    return callbacks


@contextlib.contextmanager
def driver_mlflow_kept():
    """Give this process its MLflow settings back after a sweep. Tune's MLflow callback runs in the
    driver and points MLflow there at the sweep's store, and mlflow.set_tracking_uri also writes
    MLFLOW_TRACKING_URI into os.environ (for subprocesses, MLflow says): left so, every later run of the
    session (a notebook, a script looping over sweeps) would hand that URI to its logging actor
    (tracker_env) and log into the finished sweep's store, not beside its own runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    with environment_kept("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        try:
            yield
        finally:
            if "mlflow" in sys.modules:  # MLflow's own process-wide URI (this also sets or unsets the variable)
                sys.modules["mlflow"].set_tracking_uri(uri)


@contextlib.contextmanager
def environment_kept(*names: str):
    """This process's environment variables `names` as they were, whatever the block sets or removes."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sweep_trial_targets(targets: List[str]) -> List[str]:
    """What each trial's own run still logs: TensorBoard; the others go through Tune's callbacks."""
    return [target for target in targets if target == "tensorboard"]

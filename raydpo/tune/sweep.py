"""Ray Tune over DPOConfig fields.

Under Ray 2.60's Train V2 a TorchTrainer cannot be handed to tune.Tuner: each trial is a function
trainable that runs one `fit` (see train/trainer.py) with TuneReportCallback, which forwards every
logged step to Tune so ASHA / PBT can stop or perturb trials. The data is tokenized once on the
driver; every trial trains on that same materialized dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray import tune

from raydpo import cluster, storage
from raydpo.config import DPOConfig
from raydpo.placement_group_cleaner import session_cleaner
from raydpo.train.trainer import DPOTrainer, export_model, fit, with_reference_logps
from raydpo.train.trackers import (check_trackers_storage, driver_mlflow_kept, environment_kept, report_targets,
                                   sweep_trial_targets, tune_callbacks)
from raydpo.tune.report import TRIALS_FILE, write_report

SEARCH_FUNCTIONS = {
    "grid_search": tune.grid_search,
    "choice": tune.choice,
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(*bounds),
}


@dataclass
class SweepResult:
    results_dir: str
    table: list  # one dict per trial: its swept fields and final metrics
    best_config: dict
    best_model_dir: Optional[str]
    csv_path: str
    plot_path: str


def search_space_from_dict(space: dict) -> dict:
    """YAML-friendly search space -> Tune's: {"beta": {"grid_search": [0.1, 0.5]}, "seed": 3}.

    Each value is either a constant or a one-key dict naming a Tune sampler: grid_search, choice,
    uniform [low, high], loguniform [low, high], randint [low, high].
    """
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    out = {}
    for name, value in space.items():
        if name not in fields:
            raise ValueError(f"search_space: {name!r} is not a DPOConfig field")
        if hasattr(value, "sample"):  # already a Tune sampler (tune.choice(...), ...)
            out[name] = value
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SEARCH_FUNCTIONS:
            kind, argument = next(iter(value.items()))
            out[name] = SEARCH_FUNCTIONS[kind](argument)
        elif isinstance(value, dict) and not any(k in SEARCH_FUNCTIONS for k in value):
            out[name] = value  # a dict-valued field (e.g. deepspeed), held constant
        elif isinstance(value, dict):
            raise ValueError(f"search_space.{name}: use exactly one of {sorted(SEARCH_FUNCTIONS)}")
        else:
            out[name] = value
    return out


def _scheduler(name: Optional[str], metric: str, mode: str, space: dict):
    if name in (None, "none", "fifo"):
        return None
    if name == "asha":
        return tune.schedulers.ASHAScheduler(metric=metric, mode=mode, time_attr="global_step",
                                             grace_period=1, reduction_factor=2)
    if name == "pbt":
        mutations = {k: v for k, v in space.items() if hasattr(v, "sample")}
        return tune.schedulers.PopulationBasedTraining(metric=metric, mode=mode, time_attr="global_step",
                                                       perturbation_interval=2, hyperparam_mutations=mutations)
    raise ValueError(f"scheduler must be 'asha', 'pbt' or None, got {name!r}")


def _concurrency(base: DPOConfig, requested: Optional[int]) -> int:
    if requested:
        return requested
    if base.use_gpu:  # over the GPUs an autoscaler can add too
        return max(1, int(cluster.capacity().get("GPU", 0) // base.num_workers))
    resources = ray.cluster_resources()
    # On CPUs, one trial per worker's worth of cores: a trial's start-up (process spawn, imports, engine)
    # barely uses them, so two trials on 2 cores beat one at a time (bench/sweep_vs_trl.py: 1.19x vs 1.08x).
    return max(1, int(resources.get("CPU", 1) // base.num_workers))


def _trial(trial_config: dict, *, base: dict, trainer: DPOTrainer, trials_dir: str):
    """One trial: a whole Ray Train run reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = DPOConfig(**{**base, **trial_config, "run_name": trial_id, "storage_path": trials_dir})
    fit(config, trainer.model, trainer.ref_model, trainer.processing_class, trainer.train_data,
        callbacks=[TuneReportCallback()], peft_config=trainer.peft_config, eval_data=trainer.eval_data)


TRIAL_RESOURCES = {"memory": 1024}  # what a trial's own process asks for (see the Tuner below)

# Fields that change the reference log-probs: sweeping one means each trial precomputes its own.
REFERENCE_SETTINGS = {"max_length", "truncation_mode", "ld_alpha", "model_init_kwargs"}

TUNE_FIELDS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
               "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
               "iterations_since_restore", "should_checkpoint", "config", "checkpoint_path"}


def _trial_record(result, space: dict, results_dir: str) -> dict:
    """What the report needs of one Tune trial: its swept values, every logged step, its checkpoint (a
    URI like results_dir's when that is one: Ray reports the path on the storage filesystem)."""
    frame = result.metrics_dataframe
    rows = frame.to_dict("records") if frame is not None else []
    history = [{k: v for k, v in row.items() if k not in TUNE_FIELDS and not k.startswith("config/")
                and v == v}  # v == v drops NaN: a checkpoint-only report has no metrics
               for row in rows]
    checkpoints = [row.get("checkpoint_path") for row in rows if isinstance(row.get("checkpoint_path"), str)]
    return {"trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path),
            "config": {k: result.config.get(k) for k in space},
            "history": [h for h in history if "loss" in h or "eval_loss" in h],
            "checkpoint": storage.to_uri(results_dir, checkpoints[-1]) if checkpoints else None,
            "error": str(result.error) if result.error else None}


def sweep(model: str, train_dataset: Any, search_space: dict, args: Optional[DPOConfig] = None,
          ref_model: Optional[str] = None, processing_class=None, scheduler: Optional[str] = "asha",
          metric: Optional[str] = None, mode: Optional[str] = None, num_samples: int = 1,
          max_concurrent_trials: Optional[int] = None, name: Optional[str] = None,
          eval_dataset: Any = None) -> SweepResult:
    """Run one DPO training per sampled config; return the results table and the best model.

    search_space maps DPOConfig fields to Tune samplers (tune.grid_search, tune.choice, ...) or to
    the YAML form accepted by search_space_from_dict. metric/mode default to the eval set's
    "eval_rewards/accuracies", maximised, with an eval_dataset (evaluated every logging step unless
    eval_strategy says otherwise), else train loss, minimised.
    """
    base = args or DPOConfig()
    if base.num_workers == 0:  # a trial reports to Tune through Ray Train's TuneReportCallback, which local mode skips
        raise ValueError("sweep: num_workers=0 (local mode) is for single runs; each sweep trial is a Ray Train run "
                         "reporting to Tune: set num_workers >= 1")
    if eval_dataset is not None and base.eval_strategy == "no":
        base = dataclasses.replace(base, eval_strategy="steps")
    space = search_space_from_dict(search_space)
    metric = metric or ("eval_rewards/accuracies" if eval_dataset is not None else "loss")
    if metric.startswith("eval/"):  # raydpo's former name for eval metrics, still accepted
        metric = "eval_" + metric[len("eval/"):]
    mode = mode or ("min" if metric.endswith("loss") else "max")
    # output_dir: a local folder (shared by the nodes on a cluster) or a URI (s3://...; raydpo.storage)
    results_dir = storage.join(storage.absolute(base.output_dir), name or time.strftime("sweep-%Y%m%d-%H%M%S"))
    trials_dir = storage.join(results_dir, "trials")
    if not storage.is_uri(results_dir):
        os.makedirs(trials_dir, exist_ok=True)
    check_trackers_storage(base.report_to, results_dir)

    # Tokenize once on the driver (paths resolved before Tune changes each trial's working directory).
    trainer = DPOTrainer(model, ref_model=ref_model, args=base, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class)
    base = trainer.args  # use_gpu resolved against the cluster
    if base.precompute_ref_log_probs and not set(space) & REFERENCE_SETTINGS:
        # Every trial scores the same rows with the same reference: one actor-pool pass for all.
        trainer.train_data, trainer.eval_data = (
            with_reference_logps(data, base, trainer.model, trainer.ref_model, trainer.processing_class)
            if data is not None else None for data in (trainer.train_data, trainer.eval_data))
    concurrency = _concurrency(base, max_concurrent_trials)
    base_values = base.to_dict()
    if base.resources_per_worker is None and not base.use_gpu:
        # Concurrent trials share the CPUs that one run would otherwise take alone (streamed: its pool's too).
        alone = cluster.sizes(base)
        base_values["resources_per_worker"] = {"CPU": round(max(0.1, alone.worker["CPU"] / concurrency), 2)}
        if base.torch_threads_per_worker is None:  # concurrent trials' workers share the cores, not each all of them
            base_values["torch_threads_per_worker"] = max(1, (os.cpu_count() or 1) // (concurrency * base.num_workers))
        if base.stream_ref_log_probs and base.precompute_ref_resources is None:
            base_values["precompute_ref_resources"] = {"CPU": round(max(0.1, alone.actor["CPU"] / concurrency), 2)}
    base_values["output_dir"] = results_dir
    if isinstance(base.deepspeed, str):  # a JSON path exists on the driver only: trials run anywhere
        base_values["deepspeed"] = base.deepspeed_dict()
    targets = report_targets(base.report_to)
    base_values["report_to"] = sweep_trial_targets(targets)  # MLflow / W&B runs come from Tune's callbacks

    # With a URI the report is written to a local staging folder, then uploaded with the trials' records.
    remote = storage.is_uri(results_dir)
    staging = tempfile.mkdtemp(prefix="raydpo-sweep-") if remote else results_dir
    trainable = tune.with_parameters(_trial, base=base_values, trainer=trainer, trials_dir=trials_dir)
    tuner = tune.Tuner(
        # The trial only waits on its Ray Train run, so it asks for no CPU: a sliver of one (0.01) on a node
        # leaves 0.99 there, which a 1-CPU worker no longer fits, and with a trial on each small node every
        # run waits forever (tests/test_multinode.py hit it). Tune refuses an empty request: 1 KiB of memory.
        tune.with_resources(trainable, TRIAL_RESOURCES),
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=concurrency,
                                    scheduler=_scheduler(scheduler, metric, mode, space),
                                    metric=None if scheduler in ("asha", "pbt") else metric,
                                    mode=None if scheduler in ("asha", "pbt") else mode),
        run_config=tune.RunConfig(name="tune", storage_path=storage.resolve(results_dir)[1] if remote else results_dir,
                                  storage_filesystem=storage.resolve(results_dir)[0] if remote else None, verbose=1,
                                  callbacks=tune_callbacks(targets, staging if remote else results_dir)),
    )
    session_cleaner()  # made by this driver, so every trial's runs share it (placement_group_cleaner.py)
    # Eval metrics come only at evaluation steps; the schedulers skip results without the metric, but
    # Tune's strict check would fail the trial on the first one.
    # (and Tune's Ctrl-C handler, which outlives the sweep in Ray 2.60: cluster.signal_handlers_kept)
    with environment_kept("TUNE_DISABLE_STRICT_METRIC_CHECKING"), driver_mlflow_kept(), cluster.signal_handlers_kept():
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        grid = tuner.fit()  # (Tune's MLflow callback repoints this process's MLflow: given back after)
    records = [_trial_record(result, space, results_dir) for result in grid]
    if all(r["error"] for r in records):
        raise RuntimeError(f"every trial failed; first error: {records[0]['error']}")
    with open(os.path.join(staging, TRIALS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    table, best = write_report(staging, metric, mode)
    if remote:
        storage.copy_dir(staging, results_dir)
        shutil.rmtree(staging, ignore_errors=True)
    best_model_dir = None
    if best is not None and best.get("checkpoint"):
        best_model_dir = export_model(best["checkpoint"], storage.join(results_dir, "best_model"))
    return SweepResult(results_dir=results_dir, table=table, best_config=best["config"] if best else {},
                       best_model_dir=best_model_dir, csv_path=storage.join(results_dir, "results.csv"),
                       plot_path=storage.join(results_dir, "learning_curves.png"))


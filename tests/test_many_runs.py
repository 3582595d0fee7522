"""One Ray session, many runs (issue 15): trainings of every kind (local mode too) and a sweep back to back
in one driver, then what each run must show.

`session_runs` runs them once, in order, in this module's share of the session. Every run must finish,
give back its placement group and CPUs before the next one starts (a leftover makes a later run wait
forever at "Requesting resources"), and the last run, a repeat of the first, must not start much slower
than the first did. The other tests here read the runs' outputs: 2 workers under ZeRO 0/2/3 log every
metric, the three reference modes agree, and the sweep reports. Each of those runs would otherwise be run
again by a test of its own, paying Ray Train's start-up (~15 s) each time."""

import csv
import glob
import math
import os
import signal
import statistics
import time

import pytest
import ray
from ray import tune

from raydpo import DPOConfig, DPOTrainer, cluster
from raydpo.placement_group_cleaner import session_cleaner
from raydpo.train.history import session_histories
from raydpo.tune import sweep

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "learning_rate", "grad_norm", "epoch", "global_step", "num_tokens"]
ROWS, EVAL_ROWS = slice(0, 40), slice(200, 212)
REFERENCE_POOL = dict(precompute_ref_batch_size=3, precompute_ref_num_actors=2, precompute_ref_cache_dir=None)
# (kind, DPOConfig overrides); None is the sweep
LIGHT = dict(max_steps=2, eval_strategy="no", save_strategy="no", report_to="none")  # the runs checked only for finishing
KINDS = [
    ("1 worker, ZeRO-0", dict(num_workers=1, zero_stage=0, **LIGHT)),
    # stage 0 also logs to MLflow (a local file store) and W&B (offline)
    ("2 workers, ZeRO-0", dict(zero_stage=0, report_to=["tensorboard", "mlflow", "wandb"])),
    # the three reference modes (in-worker, precomputed, streamed), each with the eval split's own reference log-probs
    ("2 workers, ZeRO-2, in-worker reference", dict(zero_stage=2)),
    ("2 workers, ZeRO-3, precomputed reference", dict(zero_stage=3, precompute_ref_log_probs=True,
                                                      precompute_ref_resources={"CPU": 0.5}, **REFERENCE_POOL)),
    ("2 workers, ZeRO-3, streamed reference", dict(zero_stage=3, stream_ref_log_probs=True,
                                                   **REFERENCE_POOL)),  # actors sized from the cluster
    # local mode: the loop in this (the driver's) process, one DeepSpeed engine after another in it
    ("local mode, ZeRO-3", dict(num_workers=0, zero_stage=3, **LIGHT)),
    ("local mode, ZeRO-0", dict(num_workers=0, zero_stage=0, **LIGHT)),
    ("sweep", None),
    ("1 worker, ZeRO-0 again", dict(num_workers=1, zero_stage=0, **LIGHT)),
]
TWO_WORKERS = [kind for kind, overrides in KINDS if overrides and "num_workers" not in overrides]


def run_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), run_name="run", num_workers=2, max_steps=3, logging_steps=1,
                  save_steps=100, per_device_train_batch_size=4, learning_rate=1e-3, max_length=32,
                  eval_strategy="steps", eval_steps=3)
    values.update(overrides)
    return DPOConfig(**values)


def run_sweep(tiny_model, parity_rows, tmp_path):
    """Four trials of one Ray Train worker each, two at a time, under ASHA, tracked in MLflow."""
    args = DPOConfig(output_dir=str(tmp_path), num_workers=1, max_steps=4, logging_steps=1, save_steps=2,
                     per_device_train_batch_size=8, learning_rate=1e-3, max_length=32, eval_strategy="steps",
                     eval_steps=2, report_to=["tensorboard", "mlflow"])
    # with an eval set the sweep metric defaults to eval_rewards/accuracies (max), logged at steps 2 and 4
    return sweep(tiny_model, parity_rows[:64], {"beta": tune.grid_search([0.1, 0.5]),
                                                "learning_rate": {"grid_search": [1e-3, 3e-3]}},
                 args=args, scheduler="asha", name="grid", max_concurrent_trials=2,
                 eval_dataset=parity_rows[200:216])


@pytest.fixture(scope="module")
def session_runs(ray_session, tiny_model, parity_rows, tmp_path_factory):
    """{kind: {"trainer", "output" (or "sweep"), "dir", "leftovers", "ctrl-c handler kept"}} of every kind
    in KINDS, run in order."""
    runs = {}
    history_actors = len(cluster.session_actors([("class_name", "=", "MetricsHistory")]))
    handlers = driver_signal_handlers()  # the driver's Ctrl-C (and SIGUSR1) handlers: every run gives them back
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        for i, (kind, overrides) in enumerate(KINDS):
            path = tmp_path_factory.mktemp(f"run{i}")
            if overrides is None:
                import mlflow

                runs[kind] = {"sweep": run_sweep(tiny_model, parity_rows, path), "dir": path,
                              "mlflow after": (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())}
            else:
                args = run_config(path, **overrides)
                trainer = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[ROWS],
                                     eval_dataset=parity_rows[EVAL_ROWS] if args.eval_strategy != "no" else None)
                runs[kind] = {"trainer": trainer, "output": trainer.train(), "dir": path}
            runs[kind]["leftovers"] = cluster.leftovers()
            runs[kind]["ctrl-c handler kept"] = driver_signal_handlers() == handlers
    runs["run history actors started"] = len(cluster.session_actors([("class_name", "=", "MetricsHistory")])) - history_actors
    return runs


def test_many_runs_in_one_session_all_finish_and_give_back_their_resources(session_runs):
    to_first_step = {}
    for kind, overrides in KINDS:
        run = session_runs[kind]
        left = run["leftovers"]
        assert not left["placement_groups"] and not left["cpus_in_use"], f"after {kind}: {left}"
        # Ray Train's fit() and Tune's install SIGINT handlers that outlive them; raydpo gives the driver its own back
        assert run["ctrl-c handler kept"], f"after {kind}: Ctrl-C still goes to a finished run or sweep"
        if overrides is None:
            assert [row["status"] for row in run["sweep"].table] == ["ok"] * 4, kind
            continue
        steps = run["trainer"].args.max_steps
        assert [h["global_step"] for h in run["output"].history] == list(range(1, steps + 1)), kind
        to_first_step[kind] = run["output"].startup["total"]
    # no run (the sweep's trials included) started Ray Train's per-run DatasetManager actor: each worker's
    # shard is in its spec (raydpo.train.trainer.RunTrainer); the state API lists finished actors too
    assert cluster.session_actors([("class_name", "=", "DatasetManager")]) == []
    ray_train_runs = [kind for kind, overrides in KINDS if overrides and overrides.get("num_workers") != 0]
    assert len(cluster.session_actors([("class_name", "=", "TrainController")])) >= len(ray_train_runs)
    # and no run's controller or metrics actor outlives it (Ray's handler held the last one's, with torch loaded)
    assert alive_after_runs(["TrainController", "MetricsHistory"]) == []
    # only the run that logs to MLflow and W&B and the sweep's 4 trials (made in Tune's processes, which
    # Tune may end without a word) had a history actor of their own; every other run's history lived in
    # the session's one actor (raydpo/train/history.py), and is closed
    assert session_runs["run history actors started"] == 1 + 4
    assert ray.get(session_histories().open_runs.remote()) == []
    # every Ray Train run, each sweep trial's too, had its placement group watched by the session's one
    # cleaner (raydpo/placement_group_cleaner.py), none by a cleaner actor of its own, and unwatched it at its end
    assert cluster.session_actors([("class_name", "=", "PlacementGroupCleaner")]) == []
    cleaner = ray.get(session_cleaner().status.remote())
    assert cleaner["registered"] >= len(ray_train_runs) + 4 and cleaner["watched"] == {}, cleaner
    assert cleaner["removed"] == [], cleaner  # no controller died
    first, last = to_first_step["1 worker, ZeRO-0"], to_first_step["1 worker, ZeRO-0 again"]
    # generous: a 2-core machine's timings vary by tens of percent; a run left waiting on resources
    # (the failure this guards) waits for minutes
    assert last < 2.5 * first + 10, to_first_step
    assert max(to_first_step.values()) < 4 * statistics.median(to_first_step.values()) + 10, to_first_step


def test_the_session_histories_keep_each_run_apart(ray_session, tmp_path):
    """Two runs' histories open at once in the session's one SessionHistories actor (as a notebook's
    interrupted run and its next may be), called as a run's own actor is: each run's rows, events and marks stay its own, a closed run is
    gone, a discarded one (a failed run) too, and the driver finds the same actor each time."""
    from raydpo.train.history import SharedHistory, discard_history, open_history

    first, second = (open_history(["tensorboard"], str(tmp_path / name), name, {"beta": 0.1}) for name in "ab")
    assert isinstance(first, SharedHistory) and first.actor._actor_id == second.actor._actor_id
    assert session_histories()._actor_id == first.actor._actor_id
    refs = [first.append.remote({"global_step": 1, "loss": 0.5}), second.append.remote({"global_step": 1, "loss": 0.9}),
            first.mark.remote({"model": 1.0}), first.append.remote({"global_step": 2, "loss": 0.4}),
            second.end_step.remote(1), first.ack.remote(2, False)]
    ray.get(refs)
    assert ray.get(first.control.remote(2)) is False and ray.get(second.control.remote(1)) is None
    assert [event for event, _ in ray.get(second.events_since.remote(0))] == ["log", "end"]
    assert ray.get(first.startup_marks.remote()) == {"model": 1.0} and ray.get(second.startup_marks.remote()) == {}
    assert sorted(ray.get(first.actor.open_runs.remote())) == sorted([first.key, second.key])
    assert [row["loss"] for row in ray.get(first.close.remote())] == [0.5, 0.4]
    assert glob.glob(str(tmp_path / "a" / "tensorboard" / "events.*"))  # its TensorBoard writer wrote and closed
    discard_history(second)
    assert ray.get(first.actor.open_runs.remote()) == []
    with pytest.raises(ray.exceptions.RayTaskError, match="closed, discarded or never opened"):  # a closed run takes no more rows
        ray.get(first.append.remote({"global_step": 3}))
    # a tracker that keeps state per process gets the run an actor of its own, with the driver's settings
    own = open_history(["tensorboard", "mlflow"], str(tmp_path / "c"), "c", {})
    assert not isinstance(own, SharedHistory)
    ray.kill(own)

    # and so does a run made in a Ray process (a sweep's trial), which Tune may end without a word
    @ray.remote(num_cpus=0)
    def shared_in_a_ray_process(run_dir):
        return isinstance(open_history(["tensorboard"], run_dir, "d", {}), SharedHistory)

    assert ray.get(shared_in_a_ray_process.remote(str(tmp_path / "d"))) is False


def test_the_session_cleaner_removes_only_a_dead_controllers_placement_group(ray_session):
    """raydpo/placement_group_cleaner.py with stand-ins for Ray Train's controllers (actors that create a
    placement group, as a controller does for its workers): the one killed while watched loses its group
    within a few of the cleaner's checks; the one that unwatched first (a run's normal end) keeps its group,
    which its own shutdown removes. One cleaner serves the whole driver."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:
        def start(self):
            self.group = placement_group([{"CPU": 0.1}])
            ray.get(self.group.ready())
            return ray.get_runtime_context().get_actor_id(), self.group

    cleaner = session_cleaner()
    assert session_cleaner()._actor_id == cleaner._actor_id  # get-or-create: the same actor for every run
    killed, ended = Controller.remote(), Controller.remote()
    (killed_id, killed_group), (ended_id, ended_group) = ray.get([killed.start.remote(), ended.start.remote()])
    ray.get([cleaner.watch.remote(killed_id, killed_group), cleaner.watch.remote(ended_id, ended_group)])
    ray.get(cleaner.unwatch.remote(ended_id))
    ray.kill(killed)
    ray.kill(ended)
    deadline = time.monotonic() + 30
    while placement_group_table(killed_group)["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert placement_group_table(killed_group)["state"] == "REMOVED"
    status = ray.get(cleaner.status.remote())
    assert killed_group.id.hex() in status["removed"] and killed_id not in status["watched"], status
    time.sleep(3)  # three more checks: the unwatched controller's group is not the cleaner's to remove
    assert placement_group_table(ended_group)["state"] == "CREATED"
    remove_placement_group(ended_group)


@pytest.mark.parametrize("kind", TWO_WORKERS)
def test_two_workers_every_metric_finite(session_runs, kind, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the runs' MLflow file store
    run = session_runs[kind]
    out, path = run["output"], run["dir"]
    assert [h["global_step"] for h in out.history] == [1, 2, 3]
    for name in METRICS:
        assert name in out.metrics and math.isfinite(out.metrics[name]), name
    assert out.metrics == out.history[-1]
    assert out.history[-1]["num_tokens"] > out.history[0]["num_tokens"] > 0
    assert out.checkpoint and out.checkpoint.endswith("checkpoint-3")
    # where start-up went, phase by phase (bench/startup.py prints it): every phase measured, in order
    assert list(out.startup) == ["worker group", "imports and process group", "data shard", "model load",
                                 "deepspeed init", "reference", "first step", "total"]
    assert all(seconds >= 0 for seconds in out.startup.values()) and out.startup["total"] > 0
    events = list(path.glob("*/tensorboard/events.out.tfevents.*"))
    assert events and b"train/rewards/margins" in events[0].read_bytes()
    if run["trainer"].args.zero_stage == 3:  # the export gathers ZeRO-3 shards: it loads with plain transformers
        assert_saved_model_generates(run["trainer"], path / "final")
    if "mlflow" in run["trainer"].args.report_to:
        assert_tracked(path, out.history)


def test_reference_modes_agree(session_runs):
    """In-worker, precomputed and streamed reference log-probs give the same step-1 loss, rewards and eval
    metrics on 2 workers (in-worker under ZeRO-2, the actor pools' under ZeRO-3); the eval split gets its own
    reference log-probs."""
    def first(kind):
        history = session_runs[kind]["output"].history
        return {**history[0], **{k: v for k, v in history[-1].items() if k.startswith("eval_")}}

    a = first("2 workers, ZeRO-2, in-worker reference")
    for kind in ("2 workers, ZeRO-3, precomputed reference", "2 workers, ZeRO-3, streamed reference"):
        b = first(kind)
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                     "logps/rejected", "eval_loss", "eval_rewards/margins"):
            assert b[name] == pytest.approx(a[name], abs=1e-5), (kind, name)


def test_sweep_runs_trials_and_reports(session_runs, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the trials' MLflow file store
    from raydpo.cli import main as cli

    result = session_runs["sweep"]["sweep"]
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
    # session's next runs (the last one here among them) log beside their own runs, not into this store
    # (trackers.driver_mlflow_kept)
    variable, uri = session_runs["sweep"]["mlflow after"]
    assert variable is None and "grid" not in uri

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.best_model_dir)

    # `raydpo report` rebuilds the table and the plot from the saved results alone.
    os.remove(result.plot_path)
    capsys.readouterr()
    assert cli(["report", result.results_dir]) == 0
    assert "<- best" in capsys.readouterr().out and os.path.exists(result.plot_path)


def driver_signal_handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)


def alive_after_runs(class_names, wait_s=30.0):
    """The session's actors of these classes still alive `wait_s` after the runs (Ray ends an actor
    asynchronously once its last handle is gone)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [f"{a.class_name} pid={a.pid}" for a in cluster.session_actors([("state", "=", "ALIVE")])
                 if a.class_name in class_names]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def assert_tracked(tmp_path, history):
    """The MLflow run holds every logged step of train/loss and the config; W&B wrote its offline run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp_path}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("raydpo").experiment_id])
    assert run.info.run_name == "run" and run.data.params["beta"] == "0.1"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [h["global_step"] for h in history]
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in history])
    assert list(tmp_path.glob("run/wandb/offline-run-*/run-*.wandb"))


def assert_saved_model_generates(trainer, directory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer.save_model(str(directory))
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer("number 1 2 3 is", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 0

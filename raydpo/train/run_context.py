"""Everything the training loop asks of Ray, behind one small object: this worker's rank and data shard,
the checkpoint to resume from, and where metrics, checkpoints and "may I go on?" questions go.

`RayRunContext` is what `loop.train_loop_per_worker` uses inside Ray Train; `LocalRunContext` is local
mode's (num_workers=0: the loop in the driver's process, `loop.train_in_process`). tests/test_loop.py
hands the loop a fake with the same methods, so the loop's control flow runs without Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, ContextManager, List, Optional, Tuple

import ray
import ray.train
import torch

from raydpo import cluster, storage
from raydpo.config import DPOConfig
from raydpo.data.shard import Shard
from raydpo.train.spec import WorkerSpec
from raydpo.train.startup import StartupClock

SAVE_PREFIX = "raydpo-checkpoint-"  # local folder a checkpoint is written to before Ray Train takes it


def prepare_process(config: DPOConfig, rank: int, processes_on_node: int, new_process: bool = True) -> StartupClock:
    """Make this process ready to train (logs, DeepSpeed's build cache, threads, seed) and start its clock
    (`new_process`: a Ray Train worker started for the run, not the driver)."""
    cluster.quiet_logs(config.log_level, worker=True)
    # DeepSpeed JIT-builds a small op on first use; a shared cache folder pays that once per machine.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/raydpo/torch_extensions"))
    # ...built by whichever `ninja` PATH finds first. Two versions (the environment's pip ninja and a
    # system one, e.g. a job whose PATH has the venv's bin and one whose PATH has not) each rebuild
    # what the other built, ~30 s every time: this Python environment's own bin comes first.
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = config.torch_threads_per_worker or max(1, (os.cpu_count() or 1) // processes_on_node)
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    return StartupClock(rank, new_process)  # where start-up time goes (TrainOutput.startup)


def given_checkpoint(spec: WorkerSpec) -> ContextManager[Optional[str]]:
    """The run's resume_from_checkpoint folder while the block runs: downloaded to this node when it is a
    URI; None for a fresh start."""
    path = spec.resume_from_checkpoint
    if storage.is_uri(path):
        return storage.local_dir(path)
    return contextlib.nullcontext(path)


class _SharedContext:
    """What both contexts share: the data shard the spec names, and what they send to the run's
    MetricsHistory actor (history.py): start-up marks, logged rows, and the driver's answer to "may I
    go on?"."""

    spec: WorkerSpec
    rank: int
    clock: StartupClock

    def shard(self, name: str) -> Shard:
        """This worker's contiguous shard of the "train" or "eval" dataset (data/shards.py), kept as the
        Arrow blocks the object store holds (data/shard.py), not as a Python dict per row."""
        return Shard(ray.get(self.spec.shards[name][self.rank]))

    def startup_mark(self, phase: str) -> None:
        """Rank 0 notes when it reaches the end of a start-up phase (startup.PHASES); at the first
        optimizer step's end it sends the marks to the history actor, once."""
        self.clock.mark(phase)
        if phase == "first_step":
            self.clock.send(self.spec.history)

    def log(self, metrics: dict) -> None:
        """Rank 0 records a logged row (the driver prints it: progress.py; trackers and callbacks get it)."""
        if self.rank == 0:
            ray.get(self.spec.history.append.remote(metrics))

    def _saved(self, step: int) -> None:
        if self.rank == 0 and self.spec.driver_events:  # on_save (and hub_strategy="every_save") on the driver
            ray.get(self.spec.history.saved.remote(step))

    def driver_stops(self, step: int) -> bool:
        """With TrainerCallbacks on the driver: wait until it has delivered this step's events, and return
        whether one of them set control.should_training_stop. Every worker asks, so all stop together."""
        if not self.spec.wait_for_driver:
            return False
        history = self.spec.history
        if self.rank == 0:
            ray.get(history.end_step.remote(step))
        while True:
            stop = ray.get(history.control.remote(step))
            if stop is not None:
                return stop
            time.sleep(0.05)


class RayRunContext(_SharedContext):
    def __init__(self, spec: WorkerSpec, config: DPOConfig):
        """Prepare this Ray Train worker process for the run."""
        self.spec = spec
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
        self.clock = prepare_process(config, self.rank, context.get_local_world_size())

    def resume_dir(self) -> ContextManager[Optional[str]]:
        """The checkpoint folder to resume from, while the block runs: the latest one when Ray Train
        restarts a failed run, else resume_from_checkpoint (None for a fresh start)."""
        ray_checkpoint = ray.train.get_checkpoint()
        if ray_checkpoint:
            return ray_checkpoint.as_directory()
        return given_checkpoint(self.spec)

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics)

    def save(self, step: int, metrics: dict, write: Callable[[str], None]) -> None:
        """Write a checkpoint with `write(folder)`, then publish it: Ray Train makes it the latest
        checkpoint only after the whole folder is written and copied to storage, so a kill mid-save
        leaves the previous one as the latest."""
        with tempfile.TemporaryDirectory(prefix=SAVE_PREFIX) as directory:
            write(directory)
            ray.train.report(metrics or {"global_step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint-{step}")
        self._saved(step)


class CheckpointKeeper:
    """Local mode's checkpoint bookkeeping, by Ray Train's own rule (ray.train.CheckpointConfig), so that a
    run keeps the same checkpoints with or without workers: checkpoints are ranked by `score_attribute`
    (NaN worst; a missing score as -inf, before "min" negates it; a tie goes to the later one), or by
    age without one; beyond
    `num_to_keep` the lowest ranked are deleted, never the latest."""

    def __init__(self, num_to_keep: Optional[int], score_attribute: Optional[str], score_order: str = "max"):
        self.num_to_keep, self.score_attribute, self.score_order = num_to_keep, score_attribute, score_order
        self.ranked: List[Tuple[tuple, str, dict]] = []  # (rank key, path, metrics), lowest ranked first
        self.latest: Optional[str] = None

    def _key(self, metrics: dict, index: int) -> tuple:
        if self.score_attribute is None:
            return (True, float("-inf"), index)
        # As Ray: a missing score counts as -inf before the sign, so under "min" it ranks best.
        score = (1.0 if self.score_order == "max" else -1.0) * float(metrics.get(self.score_attribute, float("-inf")))
        return (True, score, index) if score == score else (False, float("-inf"), index)

    def add(self, path: str, metrics: dict) -> List[str]:
        """Record a published checkpoint; returns the paths this deleted."""
        self.ranked.append((self._key(metrics, len(self.ranked) + 1), path, metrics))
        self.ranked.sort(key=lambda entry: entry[0])
        self.latest = path
        if self.num_to_keep is None:
            return []
        worst = [entry for entry in self.ranked[:-self.num_to_keep] if entry[1] != path]
        self.ranked = [entry for entry in self.ranked if entry not in worst]
        for _, old, _ in worst:
            storage.delete_dir(old)
        return [old for _, old, _ in worst]

    def best(self, metric: str, mode: str) -> Optional[str]:
        """The kept checkpoint with the best `metric` (ray.train.Result.get_best_checkpoint's rule)."""
        scored = [(metrics[metric], path) for _, path, metrics in sorted(self.ranked, key=lambda e: e[0][2])
                  if metrics.get(metric) is not None]
        if not scored:
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda entry: entry[0])[1]


class LocalRunContext(_SharedContext):
    """Local mode (num_workers=0): the loop runs in the driver's own process, as rank 0 of one, on the whole
    dataset (the spec's one shard). Checkpoints go straight to `run_dir` (the folder Ray Train would use:
    storage/run_name), each published whole (written aside, then renamed or uploaded), and `keeper`
    applies save_total_limit."""

    def __init__(self, spec: WorkerSpec, config: DPOConfig, run_dir: str, keeper: CheckpointKeeper):
        self.spec, self.run_dir, self.keeper = spec, run_dir, keeper
        self.rank, self.world_size = 0, 1
        os.environ.setdefault("LOCAL_RANK", "0")
        self.clock = prepare_process(config, self.rank, 1, new_process=False)
        # DeepSpeed and the loop's all-reduces need a process group: one of this process alone, kept for the
        # process's later runs, since DeepSpeed caches the groups it derives from it (deepspeed.utils.groups).
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        elif torch.distributed.get_world_size() != 1:
            raise RuntimeError("num_workers=0 (local mode) runs in this process, which is already one of "
                               f"{torch.distributed.get_world_size()} processes of a torch.distributed group")

    def resume_dir(self) -> ContextManager[Optional[str]]:
        """resume_from_checkpoint (None for a fresh start): nothing restarts a local run."""
        return given_checkpoint(self.spec)

    def report(self, metrics: dict) -> None:
        """Nothing to report to: local mode runs outside Ray Train and Tune (the history actor has the rows)."""

    def save(self, step: int, metrics: dict, write: Callable[[str], None]) -> None:
        """Write a checkpoint with `write(folder)` beside its final place, then publish it whole: a local
        folder by a rename, a URI by an upload; a kill mid-save leaves the previous one as the latest."""
        final = storage.join(self.run_dir, f"checkpoint-{step}")
        if storage.is_uri(final):
            with tempfile.TemporaryDirectory(prefix=SAVE_PREFIX) as directory:
                write(directory)
                storage.copy_dir(directory, final)
        else:
            partial = final + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            write(partial)
            shutil.rmtree(final, ignore_errors=True)  # a step saved again (a resumed run's last step)
            os.replace(partial, final)
        self.keeper.add(final, metrics or {"global_step": step})
        self._saved(step)

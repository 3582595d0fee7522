"""Everything the training loop asks of Ray, behind one small object: this worker's rank and data shard,
the checkpoint to resume from, and where metrics, checkpoints and "may I go on?" questions go.

`RayRunContext` is what `loop.train_loop_per_worker` uses inside Ray Train; tests/test_loop.py hands
the loop a fake with the same methods, so the loop's control flow runs without Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Callable, ContextManager, Optional

import ray
import ray.train
import torch

from raydpo import cluster, storage
from raydpo.config import DPOConfig
from raydpo.data.shard import Shard
from raydpo.train.spec import WorkerSpec
from raydpo.train.startup import StartupClock

SAVE_PREFIX = "raydpo-checkpoint-"  # local folder a checkpoint is written to before Ray Train takes it


class RayRunContext:
    def __init__(self, spec: WorkerSpec, config: DPOConfig):
        """Prepare this worker process (logs, DeepSpeed's build cache, threads, seed) for the run."""
        self.spec = spec
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        cluster.quiet_logs(config.log_level, worker=True)
        os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
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
        threads = config.torch_threads_per_worker or max(1, (os.cpu_count() or 1) // context.get_local_world_size())
        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        self.clock = StartupClock(self.rank)  # where start-up time goes (TrainOutput.startup)

    def startup_mark(self, phase: str) -> None:
        """Rank 0 notes when it reaches the end of a start-up phase (startup.PHASES); at the first
        optimizer step's end it sends the marks to the history actor, once."""
        self.clock.mark(phase)
        if phase == "first_step":
            self.clock.send(self.spec.history)

    def shard(self, name: str) -> Shard:
        """This worker's contiguous shard of the "train" or "eval" dataset (data/shards.py), kept as
        the Arrow blocks Ray Data delivers (data/shard.py), not as a Python dict per row."""
        return Shard.read(ray.train.get_dataset_shard(name))

    def resume_dir(self) -> ContextManager[Optional[str]]:
        """The checkpoint folder to resume from, while the block runs: the latest one when Ray Train
        restarts a failed run, else resume_from_checkpoint (None for a fresh start)."""
        ray_checkpoint = ray.train.get_checkpoint()
        if ray_checkpoint:
            return ray_checkpoint.as_directory()
        path = self.spec.resume_from_checkpoint
        if storage.is_uri(path):  # downloaded to this worker's node for the block
            return storage.local_dir(path)
        return contextlib.nullcontext(path)

    def log(self, metrics: dict) -> None:
        """Rank 0 records a logged row (the driver prints it: progress.py; trackers and callbacks get it)."""
        if self.rank == 0:
            ray.get(self.spec.history.append.remote(metrics))

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

"""The per-worker training loop: one readable DPO loop over this worker's shard, in phases.

`train_loop_per_worker` is what Ray Train runs in each worker. It gets a `WorkerSpec` (spec.py, built
by trainer.fit) and asks Ray for nothing itself: everything Ray-facing (the data shard, the checkpoint
to resume from, reports, the metrics history, the driver's callbacks) goes through a run context
(run_context.py), so tests/test_loop.py runs this loop with a fake context and a fake engine.

The phases, as in torchtune's DPO recipe:
  setup                 load the policy (DeepSpeed engine) and the reference, resume from a checkpoint
  train                 micro-batches from the resume point: forward, backward, DeepSpeed step
  after_optimizer_step  TR-DPO sync, then log, evaluate, early-stop, save, report, ask the driver
  save_checkpoint       write a checkpoint and hand it to Ray Train
The math of one micro-batch (batch, loss, metrics, evaluation) is in step.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Iterator, List, Optional

import ray
import torch
import torch.distributed as dist

from raydpo import flops, precision
from raydpo.config import DPOConfig
from raydpo.data.batching import (cut_pairs, epoch_order, padding_free_lengths, pieces_needed, scored_chosen_tokens,
                                  token_counts)
from raydpo.data.shard import Shard
from raydpo.logprobs import text_config
from raydpo.losses import PieceShare
from raydpo.model_loading import continued_adapter, fit_to_model, load_policy
from raydpo.reference import PrecomputedReference, Reference, StreamedReference, model_reference
from raydpo.train import checkpoint
from raydpo.train.deepspeed import build_deepspeed_config, initialize_policy, zero_stage
from raydpo.train.metrics import MetricsWindow
from raydpo.train.run_context import CheckpointKeeper, LocalRunContext, RayRunContext
from raydpo.train.schedule import EarlyStopping, eval_due, log_due, resolve_ratios, save_due
from raydpo.train.spec import ResumeState, WorkerSpec
from raydpo.train.step import dpo_step, evaluate, grad_norm, make_batch

logger = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict):
    """Ray Train's entry point; its train_loop_config is {"spec": an object ref of the WorkerSpec}."""
    spec: WorkerSpec = ray.get(loop_config["spec"])
    config = process_config(spec)
    worker = DPOWorker.setup(spec, config, RayRunContext(spec, config))
    worker.train()


def train_in_process(spec: WorkerSpec, run_dir: str, keeper: CheckpointKeeper) -> None:
    """Local mode (num_workers=0): the same loop in this process, as the only worker (run_context.py)."""
    config = process_config(spec)
    DPOWorker.setup(spec, config, LocalRunContext(spec, config, run_dir, keeper)).train()


def process_config(spec: WorkerSpec) -> DPOConfig:
    """The spec's DPOConfig made definite for this process: step ratios, and bf16 / gradient checkpointing
    for its device; TF32 set."""
    config = resolve_ratios(spec.dpo_config(), spec.plan.total_steps)
    config = precision.resolve(config, on_gpu=bool(config.use_gpu) and torch.cuda.is_available())
    precision.set_tf32(config)
    return config


def build_reference(spec: WorkerSpec, config: DPOConfig, ds_config: dict, engine, resume_dir=None) -> Reference:
    """The reference mode, chosen once; the loop only uses the `Reference` interface (and, for TR-DPO,
    `reference.sync_from(policy, alpha)`). A resumed TR-DPO run reloads its moved reference."""
    if config.precompute_ref_log_probs:  # the batch carries the columns the actor pool computed
        return PrecomputedReference()
    if config.stream_ref_log_probs:  # the pool computes the columns while training runs
        # no pool: a cached precompute of these rows already put the columns in every batch
        actors = ray.get(spec.reference_pool.actors.remote()) if spec.reference_pool is not None else []
        return StreamedReference(actors, config.stream_ref_prefetch_batches)
    path = checkpoint.reference_path(spec.model, spec.ref_model, config, resume_dir)
    return model_reference(engine.module, spec.ref_model, path, config, ds_config, engine.device,
                           precision.weights_dtype(config))


class DPOWorker:
    """One worker's run. `setup` builds it; `train` runs it to the end (the last step, early stopping,
    or a driver callback's should_training_stop). Every worker takes the same decisions from the same
    all-reduced numbers (schedule.py), so they stay in lock-step without extra messages."""

    def __init__(self, spec: WorkerSpec, config: DPOConfig, context, engine, reference: Reference,
                 ds_config: dict, rows: Shard, eval_rows: Shard, resume: ResumeState):
        self.spec, self.config, self.plan, self.context = spec, config, spec.plan, context
        self.engine, self.reference, self.ds_config = engine, reference, ds_config
        self.rows, self.eval_rows = rows, eval_rows
        self.lengths = rows.lengths(config.max_length) if config.group_by_length else None
        # mfu and hfu, on GPUs whose peak raydpo knows (flops.GPU_PEAK_FLOPS); nothing is counted elsewhere
        self.peak_flops = flops.gpu_peak_flops(precision.compute_dtype(config)) if config.use_gpu else None
        self.step = resume.global_step  # optimizer steps done
        self.window = MetricsWindow()
        self.window.total_tokens = resume.num_tokens
        self.early_stopping = EarlyStopping(config, resume.early_stopping)
        self._restart_step_timer()

    # -- setup ---------------------------------------------------------------------------------------

    @classmethod
    def setup(cls, spec: WorkerSpec, config: DPOConfig, context) -> "DPOWorker":
        """Read this worker's shards, load the policy into its DeepSpeed engine and the reference, and
        restore a checkpoint's state (a restart by Ray Train, or resume_from_checkpoint)."""
        rows = context.shard("train")
        eval_rows = context.shard("eval") if spec.plan.eval_batches else Shard([])
        context.startup_mark("data")
        ds_config = build_deepspeed_config(config, context.world_size)
        in_worker = not (config.precompute_ref_log_probs or config.stream_ref_log_probs)  # the actors hold their own
        reference_adapter = continued_adapter(spec.model, spec.ref_model) if in_worker else None
        policy = load_policy(spec.model, config, spec.peft_config, reference_adapter)
        context.startup_mark("model")
        engine = initialize_policy(policy, ds_config, config, spec.plan.total_steps)
        context.startup_mark("deepspeed")
        config = fit_to_model(config, engine)
        if config.padding_free_max_tokens and config.router_aux_loss_coef:  # resolved for the model just now
            raise ValueError("DPOConfig.padding_free_max_tokens cannot be combined with an MoE load-balancing loss "
                             f"(router_aux_loss_coef {config.router_aux_loss_coef}): it is taken over the whole "
                             "micro-batch; set router_aux_loss_coef=0.0 or padding_free_max_tokens=None")
        resume = ResumeState()
        with context.resume_dir() as directory:
            reference = build_reference(spec, config, ds_config, engine, directory)
            if directory:
                resume = checkpoint.restore(engine, directory, context.rank)
        context.startup_mark("reference")
        engine.train()
        return cls(spec, config, context, engine, reference, ds_config, rows, eval_rows, resume)

    # -- train ---------------------------------------------------------------------------------------

    def train(self) -> None:
        """Run micro-batches from the resume point; after every `gradient_accumulation_steps` of them,
        DeepSpeed has stepped the optimizer and `after_optimizer_step` decides what else happens."""
        if self.step >= self.plan.total_steps:  # resumed from the final checkpoint: nothing left
            return
        if self.eval_rows and self.config.eval_on_start:
            # transformers' sanity check before training: logged, but not counted by early stopping
            self._log_and_report(self.evaluate())
            self._restart_step_timer()
        accumulation = self.config.gradient_accumulation_steps
        for micro, rows in enumerate(self.micro_batches(self.step), start=1):
            learning_rate = self.engine.get_lr()[0]  # the rate this optimizer step uses, as TRL logs it
            norm = self.train_micro_batch(rows, boundary=micro % accumulation == 0)
            if norm is None:  # gradients still accumulating
                continue
            self.step += 1
            self.context.startup_mark("first_step")  # the first one ends start-up (TrainOutput.startup)
            if self.after_optimizer_step(learning_rate, norm):
                return

    def micro_batches(self, start_step: int) -> Iterator[List[dict]]:
        """Each micro-batch's rows, from optimizer step `start_step` on, epoch after epoch. Each epoch's
        order is a pure function of (seed, epoch), so a resumed run skips exactly the batches it ran."""
        steps_per_epoch, accumulation = self.plan.steps_per_epoch, self.config.gradient_accumulation_steps
        for epoch in itertools.count(start_step // steps_per_epoch):
            order = epoch_order(len(self.rows), self.plan.micro_batches_per_epoch,
                                self.config.per_device_train_batch_size, self.config.seed, epoch, self.lengths)
            done = max(0, start_step - epoch * steps_per_epoch) * accumulation  # only in the first epoch
            yield from self.reference.rows_ahead(self.rows, order[done:])  # streamed: scored a few ahead

    def train_micro_batch(self, rows: List[dict], boundary: bool) -> Optional[float]:
        """Forward, backward and DeepSpeed's step (which steps the optimizer at an accumulation
        boundary), for each piece of the micro-batch (`pieces`). Returns the gradient norm at a boundary,
        else None."""
        pieces = self.pieces(rows)
        batches = [make_batch(piece, self.config, self.spec.tokenizer, self.spec.pad_token_id) for piece in pieces]
        chosen_tokens = [scored_chosen_tokens(batch) for batch in batches] if len(pieces) > 1 else None
        for i, (piece, batch) in enumerate(zip(pieces, batches)):
            last = i == len(pieces) - 1
            if self.config.padding_free_max_tokens:  # DeepSpeed would count each piece as a micro-batch
                self.engine.set_gradient_accumulation_boundary(boundary and last)
            # each pair (or sft's chosen token) counts as it does in the whole micro-batch's mean
            share = (PieceShare(len(piece) / len(rows), chosen_tokens[i] / max(sum(chosen_tokens), 1))
                     if chosen_tokens else None)
            loss, per_pair, per_token = dpo_step(self.engine, self.reference, batch, self.config, share)
            _require_finite("loss", float(loss.detach()), self.step + 1)  # unscaled: backward applies fp16's scale
            self.engine.backward(loss)
            # float32 weights (bf16's autocast included) without ZeRO: DeepSpeed clips but does not keep the
            # norm, so measure it before the step. Its mixed-precision optimizers keep it (unscaled), as ZeRO does.
            measure = (boundary and last and zero_stage(self.ds_config) == 0
                       and precision.weights_dtype(self.config) == torch.float32)
            unclipped = grad_norm(self.engine.module) if measure else None
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            self.window.add(loss, per_pair, per_token, token_counts(batch), self._flops(piece, batch), continues=i > 0)
        if not boundary:
            return None
        norm = unclipped if unclipped is not None else float(self.engine.get_global_grad_norm())
        if self.engine.skipped_steps > skipped_before:
            # fp16: DeepSpeed's loss scaler found inf/NaN gradients, skipped this update and lowered its
            # scale, as it is meant to; the step still counts (as in transformers' Trainer)
            logger.warning("step %d: fp16 gradients overflowed; DeepSpeed's loss scaler skipped this update "
                           "(%d skipped so far)", self.step + 1, self.engine.skipped_steps)
        else:
            _require_finite("grad_norm", norm, self.step + 1)
        return norm

    def pieces(self, rows: List[dict]) -> List[List[dict]]:
        """The micro-batch's pairs cut by padding_free_max_tokens (DPOConfig), or the micro-batch whole.
        Every worker runs as many pieces (the most any of them needs): ZeRO's collectives run per forward
        and backward, so the workers must run the same number."""
        budget = self.config.padding_free_max_tokens
        if not budget:
            return [rows]
        config = self.config
        lengths = padding_free_lengths(rows, config.max_length, config.truncation_mode, config.share_prompt)
        needed = pieces_needed(lengths, budget)
        if dist.is_available() and dist.is_initialized():
            most = torch.tensor([needed], device=self.engine.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            needed = int(most.item())
        return [[rows[i] for i in piece] for piece in cut_pairs(lengths, needed, budget)]

    # -- after each optimizer step -------------------------------------------------------------------

    def after_optimizer_step(self, learning_rate: float, norm: float) -> bool:
        """TR-DPO sync, then, as the schedule says: log, evaluate, early-stop, save, report, and ask the
        driver's callbacks whether to stop. Returns True when this was the last step."""
        config, step = self.config, self.step
        if config.sync_ref_model and step % config.ref_model_sync_steps == 0:  # TR-DPO
            self.reference.sync_from(self.engine.module, config.ref_model_mixup_alpha)
        last = step == self.plan.total_steps
        metrics = self.training_metrics(learning_rate, norm) if log_due(step, config, last) else {}
        evaluated = bool(self.eval_rows) and eval_due(step, config, self.plan.steps_per_epoch, last)
        if evaluated:
            metrics.update(self.evaluate())
            last = self.early_stopping.update(metrics) or last  # early stopping ends the run here
        saved = save_due(step, config, self.plan.steps_per_epoch, last, evaluated,
                         evaluated and self.early_stopping.new_best)
        if saved:
            self._log(metrics)
            self.save_checkpoint(metrics)  # reported with its metrics
        elif metrics:
            self._log_and_report(metrics)
        if (metrics or saved) and not last and self.context.driver_stops(step):
            # a TrainerCallback set control.should_training_stop: this is the last step, and it is kept
            if not saved and config.save_strategy != "no" and not config.load_best_model_at_end:
                self.save_checkpoint({})
            last = True
        if metrics:
            self._restart_step_timer()
        return last

    def training_metrics(self, learning_rate: float, norm: float) -> dict:
        """The logging window's averages (all-reduced over workers) and the step's own values."""
        tokens_before = self.window.total_tokens
        metrics = self.window.reduce()
        # Wall seconds per optimizer step since the last log, evaluation and save excluded, and train
        # tokens (num_tokens' count: non-pad chosen and rejected tokens) per second per worker (raydpo extras).
        elapsed = time.perf_counter() - self.window_started
        metrics.update(grad_norm=norm, learning_rate=learning_rate,
                       step_time=elapsed / (self.step - self.window_start_step),
                       tokens_per_second_per_worker=(metrics["num_tokens"] - tokens_before) / elapsed
                       / self.context.world_size)
        if self.peak_flops:  # model FLOPs, and the FLOPs the batches ran, per second per worker over the device's peak
            per_second = elapsed * self.context.world_size * self.peak_flops
            metrics["mfu"] = self.window.window_flops / per_second
            metrics["hfu"] = self.window.window_hardware_flops / per_second
        if self.config.use_gpu and torch.cuda.is_available():  # this worker's peak, in bytes (a raydpo extra)
            metrics["peak_gpu_memory"] = float(torch.cuda.max_memory_allocated())
        return metrics

    def _flops(self, rows: List[dict], batch) -> tuple:
        """This micro-batch's (model, hardware) FLOPs (flops.py), when mfu and hfu are logged."""
        if not self.peak_flops:
            return 0.0, 0.0
        model_config = text_config(self.engine)
        in_step = not (self.config.precompute_ref_log_probs or self.config.stream_ref_log_probs)
        return (flops.step_flops(model_config, flops.sequence_lengths(rows, self.config.max_length), in_step),
                flops.hardware_flops(model_config, batch, in_step, bool(self.config.gradient_checkpointing)))

    def evaluate(self) -> dict:
        return evaluate(self.engine, self.reference, self.eval_rows, self.plan.eval_batches, self.config,
                        self.spec.tokenizer, self.spec.pad_token_id)

    def save_checkpoint(self, metrics: dict) -> None:
        """A checkpoint of this step (engine, loop position, RNG, exported model), reported with `metrics`."""
        state = ResumeState(self.step, self.window.total_tokens, self.early_stopping.state())
        reference = self.reference if self.config.sync_ref_model else None  # TR-DPO's moved reference
        self.context.save(self.step, metrics, lambda directory: checkpoint.save(
            self.engine, directory, self.context.rank, self.ds_config, self.spec.tokenizer, state, reference))

    def _log(self, metrics: dict) -> None:
        """Stamp the metrics with the step and epoch, and record them (nothing when there are none)."""
        if metrics:
            metrics.update(epoch=self.step / self.plan.steps_per_epoch, global_step=self.step)
            self.context.log(metrics)

    def _log_and_report(self, metrics: dict) -> None:
        self._log(metrics)
        self.context.report(metrics)

    def _restart_step_timer(self) -> None:
        """step_time counts training only: the timer restarts after each log (evaluation and saving excluded)."""
        self.window_started, self.window_start_step = time.perf_counter(), self.step


def _require_finite(name: str, value: float, step: int):
    """Stop before a non-finite value reaches a checkpoint: the last one saved stays the last good one."""
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {name} ({value}) at step {step}; training stopped, and the "
                                 f"latest checkpoint (before step {step}) is intact")

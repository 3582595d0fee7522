"""The per-worker training loop: one readable DPO loop over this worker's shard.

Runs inside each Ray Train worker. Everything it needs arrives as a `WorkerSpec` (spec.py, built by
trainer.fit); nothing here knows about Ray Tune or the CLI.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from typing import Optional

import ray
import ray.train
import torch

from raydpo import cluster
from raydpo.config import DPOConfig
from raydpo.data.batching import Batch, collate, epoch_order, row_length, token_counts
from raydpo.logprobs import model_completion_stats, pair_logps
from raydpo.losses import dpo_loss, rewards
from raydpo.model_loading import (REF_ADAPTER, continued_adapter, fit_to_model, is_peft_model, load_model,
                                  load_policy, reference_model_path)
from raydpo.reference import InWorkerReference, PeftBaseReference, PrecomputedReference, StreamedReference
from raydpo.train import checkpoint
from raydpo.train.deepspeed import build_deepspeed_config, initialize_policy, zero_stage
from raydpo.train.metrics import MetricsWindow, pair_metrics, token_metrics
from raydpo.train.schedule import EarlyStopping, eval_due, log_due, resolve_ratios, save_due
from raydpo.train.startup import StartupClock
from raydpo.train.spec import ResumeState, WorkerSpec


def build_reference(spec: WorkerSpec, config: DPOConfig, ds_config: dict, engine, resume_dir=None):
    """The reference mode, chosen once; the loop only uses the `Reference` interface (and, for TR-DPO,
    `reference.sync_from(policy, alpha)`). A resumed TR-DPO run reloads its moved reference."""
    if config.precompute_ref_log_probs:  # the batch carries the columns the actor pool computed
        return PrecomputedReference()
    if config.stream_ref_log_probs:  # the pool computes the columns while training runs
        return StreamedReference(spec.reference_pool, config.stream_ref_prefetch_batches)
    if spec.ref_model is None and is_peft_model(engine.module):
        # the continued adapter's frozen copy ("ref", TRL's), else the base with adapters disabled: no second model
        adapter = REF_ADAPTER if REF_ADAPTER in engine.module.peft_config else None
        return PeftBaseReference(engine.module, adapter)
    path = reference_model_path(spec.model, spec.ref_model)
    if config.sync_ref_model:
        path = checkpoint.saved_reference(resume_dir) or path
    return InWorkerReference(load_model(path, config), ds_config)


def dpo_step(engine, reference, batch: Batch, config: DPOConfig):
    """Loss, per-pair metrics and token metrics of one micro-batch (chosen rows first, then rejected).
    `config` is fitted to the model (`model_loading.fit_to_model`): a router_aux_loss_coef other than 0
    (or None) adds that times the policy's MoE load-balancing loss to the loss, as TRL does, and logs it
    as aux_loss. The batch comes from `make_batch` (with config.ld_alpha, its LD-DPO weights)."""
    if (config.ld_alpha is not None) != (batch.logp_weights is not None):
        raise ValueError(f"ld_alpha={config.ld_alpha} but the batch was built with"
                         f"{'out' if batch.logp_weights is None else ''} LD-DPO weights: build it with make_batch")
    batch = batch.to(engine.device)  # collate builds it on the CPU
    aux_coef = config.router_aux_loss_coef or 0.0
    policy = model_completion_stats(engine, batch, wpo=config.use_weighting, router_logits=bool(aux_coef))
    logps = pair_logps(policy, reference.logps(batch), batch.completion_mask, config.use_weighting)
    loss = dpo_loss(logps, config)
    if policy.aux_loss is not None:
        loss = loss + aux_coef * policy.aux_loss
    chosen_rewards, rejected_rewards = rewards(logps, config.beta)
    return loss, pair_metrics(chosen_rewards, rejected_rewards, logps.chosen, logps.rejected), token_metrics(policy)


def make_batch(rows: list, config: DPOConfig, tokenizer, pad_token_id: int) -> Batch:
    """The chosen+rejected batch of these rows, LD-DPO weights included (a vision batch with its pixel values)."""
    image_processor = getattr(tokenizer, "image_processor", None)
    return collate(rows, pad_token_id, config.max_length, config.truncation_mode, config.share_prompt,
                   image_processor, ld_alpha=config.ld_alpha)


def evaluate(engine, reference, rows: list, num_batches: int, config: DPOConfig, tokenizer,
             pad_token_id: int) -> dict:
    """DPO metrics of this worker's eval rows, averaged over all workers, named "eval_<metric>" as transformers names them."""
    window, size = MetricsWindow(), config.per_device_eval_batch_size
    reference.before_eval(rows, size)  # streamed: scored once, at the first evaluation
    engine.eval()
    with torch.no_grad():
        # Every worker runs num_batches forwards (ZeRO-3 gathers weights collectively); a worker whose
        # shard ran out repeats a batch that counts for nothing.
        for i in range(num_batches):
            chunk = rows[i * size:(i + 1) * size]
            batch = make_batch(chunk or rows[:size], config, tokenizer, pad_token_id)
            loss, per_pair, per_token = dpo_step(engine, reference, batch, config)
            if chunk:
                window.add(loss, per_pair, per_token, token_counts(batch))
            else:
                window.add_padding()
    engine.train()
    metrics = window.reduce()
    del metrics["num_tokens"]  # a training counter
    return {f"eval_{name}": value for name, value in metrics.items()}


def _setup_worker(config: DPOConfig):
    context = ray.train.get_context()
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
    return context.get_world_rank(), context.get_world_size()


def train_loop_per_worker(loop_config: dict):
    spec: WorkerSpec = loop_config["spec"]  # Ray Train's train_loop_config is {"spec": WorkerSpec}
    plan = spec.plan
    config = resolve_ratios(spec.dpo_config(), plan.total_steps)
    rank, world_size = _setup_worker(config)
    clock = StartupClock(rank)  # where start-up time goes (TrainOutput.startup)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per worker would flood the log
    rows = list(ray.train.get_dataset_shard("train").iter_rows())  # this worker's contiguous shard
    eval_rows = list(ray.train.get_dataset_shard("eval").iter_rows()) if plan.eval_batches else []
    lengths = [row_length(row, config.max_length) for row in rows] if config.group_by_length else None
    clock.mark("data")

    ds_config = build_deepspeed_config(config, world_size)
    in_worker = not (config.precompute_ref_log_probs or config.stream_ref_log_probs)  # the actors hold their own
    reference_adapter = continued_adapter(spec.model, spec.ref_model) if in_worker else None
    policy = load_policy(spec.model, config, spec.peft_config, reference_adapter)
    clock.mark("model")
    engine = initialize_policy(policy, ds_config, config, plan.total_steps)
    clock.mark("deepspeed")
    config = fit_to_model(config, engine)

    step, window, state = 0, MetricsWindow(), ResumeState()
    ray_checkpoint = ray.train.get_checkpoint()  # set when Ray Train restarts a failed run
    resume_from = ray_checkpoint.as_directory() if ray_checkpoint else contextlib.nullcontext(
        spec.resume_from_checkpoint)
    with resume_from as directory:
        reference = build_reference(spec, config, ds_config, engine, directory)
        if directory:
            state = checkpoint.restore(engine, directory, rank)
            step, window.total_tokens = state.global_step, state.num_tokens
    early_stopping = EarlyStopping(config, state.early_stopping)
    clock.mark("reference")

    engine.train()
    accumulation, steps_per_epoch = config.gradient_accumulation_steps, plan.steps_per_epoch
    window_started, window_start_step = time.perf_counter(), step
    finished = step >= plan.total_steps
    if eval_rows and config.eval_on_start and not finished:
        # transformers' sanity check before training: logged, but not counted by early stopping
        metrics = evaluate(engine, reference, eval_rows, plan.eval_batches, config, spec.tokenizer, spec.pad_token_id)
        _log(metrics, step, steps_per_epoch, rank, spec)
        ray.train.report(metrics)
        window_started = time.perf_counter()
    while not finished:
        epoch = step // steps_per_epoch
        order = epoch_order(len(rows), plan.micro_batches_per_epoch, config.per_device_train_batch_size,
                            config.seed, epoch, lengths)
        first = (step - epoch * steps_per_epoch) * accumulation
        for micro, batch_rows in enumerate(reference.rows_ahead(rows, order[first:]), start=first):
            batch = make_batch(batch_rows, config, spec.tokenizer, spec.pad_token_id)
            learning_rate = engine.get_lr()[0]  # the rate this optimizer step uses, as TRL logs it
            loss, per_pair, per_token = dpo_step(engine, reference, batch, config)
            _require_finite("loss", float(loss.detach()), step + 1)
            engine.backward(loss)
            boundary = (micro + 1) % accumulation == 0
            # Without ZeRO, DeepSpeed clips but does not keep the norm: measure it before the step.
            unclipped_norm = _grad_norm(engine.module) if boundary and zero_stage(ds_config) == 0 else None
            engine.step()
            window.add(loss, per_pair, per_token, token_counts(batch))
            if not boundary:
                continue
            step += 1
            clock.mark("first_step")
            clock.send(spec.history)
            if config.sync_ref_model and step % config.ref_model_sync_steps == 0:  # TR-DPO
                reference.sync_from(engine.module, config.ref_model_mixup_alpha)
            grad_norm = unclipped_norm if unclipped_norm is not None else engine.get_global_grad_norm()
            _require_finite("grad_norm", float(grad_norm), step)
            last = step == plan.total_steps
            metrics = {}
            if log_due(step, config, last):
                metrics = window.reduce()
                # wall seconds per optimizer step since the last log, evaluation and save excluded (a raydpo extra)
                metrics.update(grad_norm=float(grad_norm), learning_rate=learning_rate,
                               step_time=(time.perf_counter() - window_started) / (step - window_start_step))
                if config.use_gpu and torch.cuda.is_available():  # this worker's peak, in bytes (a raydpo extra)
                    metrics["peak_gpu_memory"] = float(torch.cuda.max_memory_allocated())
            evaluated = bool(eval_rows) and eval_due(step, config, steps_per_epoch, last)
            if evaluated:
                metrics.update(evaluate(engine, reference, eval_rows, plan.eval_batches, config, spec.tokenizer,
                                        spec.pad_token_id))
                last = early_stopping.update(metrics) or last
            if metrics:
                _log(metrics, step, steps_per_epoch, rank, spec)
            saved_state = ResumeState(step, window.total_tokens, early_stopping.state())
            saved = save_due(step, config, steps_per_epoch, last, evaluated, evaluated and early_stopping.new_best)
            if saved:
                _save_and_report(engine, rank, ds_config, spec, metrics, step, saved_state,
                                 reference if config.sync_ref_model else None)
            elif metrics:
                ray.train.report(metrics)
            if (metrics or saved) and not last and _driver_stops(spec, step, rank):
                # a TrainerCallback set control.should_training_stop: this is the last step
                if not saved and config.save_strategy != "no" and not config.load_best_model_at_end:
                    _save_and_report(engine, rank, ds_config, spec, {}, step, saved_state,
                                     reference if config.sync_ref_model else None)
                last = True
            if metrics:
                window_started, window_start_step = time.perf_counter(), step
            if last:  # the final step, or early stopping
                finished = True
                break


SAVE_PREFIX = "raydpo-checkpoint-"  # local folder a checkpoint is written to before Ray Train takes it


def _log(metrics: dict, step: int, steps_per_epoch: int, rank: int, spec: WorkerSpec):
    """Stamp the metrics with the step and epoch; rank 0 records them (the driver prints them: progress.py)."""
    metrics.update(epoch=step / steps_per_epoch, global_step=step)
    if rank == 0:
        ray.get(spec.history.append.remote(metrics))


def _driver_stops(spec: WorkerSpec, step: int, rank: int) -> bool:
    """With TrainerCallbacks on the driver: wait until it has delivered this step's events, and return
    whether one of them set control.should_training_stop. Every worker asks, so all stop together."""
    if not spec.wait_for_driver:
        return False
    history = spec.history
    if rank == 0:
        ray.get(history.end_step.remote(step))
    while True:
        stop = ray.get(history.control.remote(step))
        if stop is not None:
            return stop
        time.sleep(0.05)


def _require_finite(name: str, value: float, step: int):
    """Stop before a non-finite value reaches a checkpoint: the last one saved stays the last good one."""
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {name} ({value}) at step {step}; training stopped, and the "
                                 f"latest checkpoint (before step {step}) is intact")


def _save_and_report(engine, rank, ds_config, spec: WorkerSpec, metrics, step, state: ResumeState, reference=None):
    # Write, then publish: Ray Train makes it the latest checkpoint only after the whole folder is
    # written and copied to storage, so a kill mid-save leaves the previous one as the latest.
    with tempfile.TemporaryDirectory(prefix=SAVE_PREFIX) as directory:
        checkpoint.save(engine, directory, rank, ds_config, spec.tokenizer, state, reference)
        ray.train.report(metrics or {"global_step": step},
                         checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint-{step}")
    if rank == 0 and spec.driver_events:  # on_save (and hub_strategy="every_save") on the driver
        ray.get(spec.history.saved.remote(step))


def _grad_norm(model) -> float:
    """Global L2 norm of the (already all-reduced) gradients."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

"""One DPO micro-batch, as the training workers and `DPOTrainer.evaluate()` both run it: the batch
from rows, the loss and metrics of the policy against the reference, and an evaluation pass."""

from __future__ import annotations

from typing import Optional

import torch

from raydpo import precision
from raydpo.config import DPOConfig
from raydpo.data.batching import Batch, collate, token_counts
from raydpo.data.shard import Shard
from raydpo.logprobs import model_completion_stats, pair_logps
from raydpo.losses import PieceShare, dpo_loss, rewards
from raydpo.reference.base import Reference
from raydpo.train.metrics import MetricsWindow, pair_metrics, token_metrics


def make_batch(rows: list, config: DPOConfig, tokenizer, pad_token_id: int) -> Batch:
    """The chosen+rejected batch of these rows, LD-DPO weights included (a vision batch with its pixel values)."""
    image_processor = getattr(tokenizer, "image_processor", None)
    return collate(rows, pad_token_id, config.max_length, config.truncation_mode, config.share_prompt,
                   image_processor, ld_alpha=config.ld_alpha, padding_free=config.padding_free)


def dpo_step(engine, reference: Reference, batch: Batch, config: DPOConfig, share: Optional[PieceShare] = None):
    """Loss, per-pair metrics and token metrics of one micro-batch (chosen rows first, then rejected).
    `config` is fitted to the model (`model_loading.fit_to_model`): a router_aux_loss_coef other than 0
    (or None) adds that times the policy's MoE load-balancing loss to the loss, as TRL does, and logs it
    as aux_loss. The batch comes from `make_batch` (with config.ld_alpha, its LD-DPO weights). `share`:
    the batch is that piece of a micro-batch (padding_free_max_tokens), and its loss is weighted by it."""
    if (config.ld_alpha is not None) != (batch.logp_weights is not None):
        raise ValueError(f"ld_alpha={config.ld_alpha} but the batch was built with"
                         f"{'out' if batch.logp_weights is None else ''} LD-DPO weights: build it with make_batch")
    batch = batch.to(engine.device)  # collate builds it on the CPU
    aux_coef = config.router_aux_loss_coef or 0.0
    with precision.autocast(config, engine.device):  # bf16: TRL's autocast, for the policy and the reference
        policy = model_completion_stats(engine, batch, wpo=config.use_weighting, router_logits=bool(aux_coef))
        reference_logps = reference.logps(batch)
    logps = pair_logps(policy, reference_logps, batch.completion_mask, config.use_weighting)
    loss = dpo_loss(logps, config, share)
    if policy.aux_loss is not None:
        loss = loss + aux_coef * policy.aux_loss
    chosen_rewards, rejected_rewards = rewards(logps, config.beta)
    return loss, pair_metrics(chosen_rewards, rejected_rewards, logps.chosen, logps.rejected), token_metrics(policy)


def evaluate(engine, reference: Reference, rows: Shard, num_batches: int, config: DPOConfig, tokenizer,
             pad_token_id: int) -> dict:
    """DPO metrics of this worker's eval rows, averaged over all workers, named "eval_<metric>" as transformers names them."""
    window, size = MetricsWindow(), config.per_device_eval_batch_size
    reference.before_eval(rows, size)
    engine.eval()
    with torch.no_grad():
        # Every worker runs num_batches forwards (ZeRO-3 gathers weights collectively); a worker whose
        # shard ran out repeats a batch that counts for nothing.
        for i in range(num_batches):
            chunk = rows.take(range(i * size, min((i + 1) * size, len(rows))))
            batch = make_batch(chunk or rows.take(range(min(size, len(rows)))), config, tokenizer, pad_token_id)
            loss, per_pair, per_token = dpo_step(engine, reference, batch, config)
            if chunk:
                window.add(loss, per_pair, per_token, token_counts(batch))
            else:
                window.add_padding()
    engine.train()
    metrics = window.reduce()
    del metrics["num_tokens"]  # a training counter
    return {f"eval_{name}": value for name, value in metrics.items()}


def grad_norm(model) -> float:
    """Global L2 norm of the (already all-reduced) gradients."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

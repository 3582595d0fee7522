"""Per-sequence completion log-probs from a causal LM's logits, chunked over the sequence.

Chunking keeps the float32 log-softmax to [B, chunk, V] at a time instead of [B, T, V].
"""

from __future__ import annotations

import torch


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                     chunk_size: int = 256) -> torch.Tensor:
    """Sum of log p(token | prefix) over completion tokens, per sequence: shape [B].

    Token t is predicted by the logits at t-1, so labels and mask are shifted left by one.
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    logits = logits[:, :-1]
    total = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[1], chunk_size):
        chunk = logits[:, start:start + chunk_size].float()
        label_chunk = labels[:, start:start + chunk_size]
        token_logps = chunk.gather(-1, label_chunk.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1)
        total = total + (token_logps * mask[:, start:start + chunk_size]).sum(-1)
    return total


def model_completion_logps(model, batch: dict) -> torch.Tensor:
    """One forward over the [2B, T] chosen+rejected batch; summed completion log-probs [2B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return completion_logps(logits, batch["input_ids"], batch["completion_mask"])

"""Held-out preference scores of a plain transformers model, with the exact tokenization, batching
and log-prob code the training workers use."""

from __future__ import annotations

from typing import Optional

import torch

from raydpo.data.batching import collate
from raydpo.data.formats import normalize
from raydpo.data.tokenize import tokenize_pair
from raydpo.logprobs import model_completion_logps


def _pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS where it has none (as the batches and `generate` both need one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()  # scoring only: no autograd graph is kept for the batches it gathers
def _pair_logps(model, tokenized: list, pad_token_id: int, max_length, truncation_mode, batch_size):
    """Summed completion log-probs (chosen [N], rejected [N])."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start:start + batch_size], pad_token_id, max_length, truncation_mode)
        logps = model_completion_logps(model, batch).float()
        half = logps.shape[0] // 2
        chosen.append(logps[:half])
        rejected.append(logps[half:])
    return torch.cat(chosen), torch.cat(rejected)


def preference_scores(model, tokenizer, rows: list, beta: float, max_length: Optional[int],
                      ref_model=None, truncation_mode: str = "keep_start", batch_size: int = 16) -> dict:
    """Score {prompt, chosen, rejected} rows, standard or conversational (as DPOTrainer tokenizes them).

    policy_prefers_chosen: fraction of pairs with logp(chosen) > logp(rejected) under `model`.
    With ref_model, also reward_accuracy (fraction with beta*log(pi/pi_ref)(chosen) >
    beta*log(pi/pi_ref)(rejected), as DPO's rewards/accuracies) and reward_margin (its mean gap).
    """
    if not rows:
        raise ValueError("preference_scores needs at least one row")
    pad_token_id = _pad_token_id(tokenizer)
    tokenized = [tokenize_pair(tokenizer, normalize(row)[1]) for row in rows]
    args = (pad_token_id, max_length, truncation_mode, batch_size)
    chosen, rejected = _pair_logps(model, tokenized, *args)
    scores = {"num_pairs": len(rows), "policy_prefers_chosen": (chosen > rejected).float().mean().item()}
    if ref_model is not None:
        ref_chosen, ref_rejected = _pair_logps(ref_model, tokenized, *args)
        chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        scores["reward_accuracy"] = (chosen_rewards > rejected_rewards).float().mean().item()
        scores["reward_margin"] = (chosen_rewards - rejected_rewards).mean().item()
    return scores


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list, max_new_tokens: int = 16) -> dict:
    """What a user sees when they prompt the model: its greedy answer to each row's prompt (rendered as
    training renders it), and whether that answer is the chosen completion's text (whitespace at the ends
    ignored). Preference scores alone can rise while generation breaks: DPO can push the rejected answer
    down faster than the chosen one up, until the greedy answer is neither.

    Returns {"num_rows", "matches_chosen" (fraction), "answers": [(chosen text, greedy answer), ...]}."""
    if not rows:
        raise ValueError("greedy_answers needs at least one row")
    model.eval()
    device = next(model.parameters()).device
    pad_token_id = _pad_token_id(tokenizer)
    answers = []
    for index, row in enumerate(rows):
        pair = normalize(row)[1]
        if pair.images:  # the prompt ids alone would leave the images out and answer another question
            raise ValueError(f"greedy_answers takes text rows; row {index} has images")
        prompt_ids = torch.tensor([tokenize_pair(tokenizer, pair)["prompt_ids"]], device=device)
        output = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        answer = tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
        chosen = "".join(m["content"] for m in pair.chosen) if pair.conversational else pair.chosen
        answers.append((chosen.strip(), answer))
    matches = sum(chosen == answer for chosen, answer in answers)
    return {"num_rows": len(rows), "matches_chosen": matches / len(rows), "answers": answers}

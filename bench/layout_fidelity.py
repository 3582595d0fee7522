"""Every batch layout raydpo gives a model, against the padded two-sequence layout (TRL's), across
transformers' decoder architectures.

    .venv/bin/python bench/layout_fidelity.py [--window 4] [--types llama,opt,...]

For each model type: a tiny random model from a generic config (hidden 32, 2 layers; `--window` sets
sliding_window where the config has one), under sdpa and eager. Its weights are drawn at 0.5 scale
(initializer_range) rather than 0.02: a model of 0.02-scale weights attends almost uniformly, so that
positions hardly count, where a trained model's attention (and so a wrong position id) counts a lot. Three requests, each fitted to the model
as a training worker fits it (`model_loading.fit_to_model`: the blockers and the padding-free probe):
share_prompt alone, padding_free alone, both. Printed first: the largest difference of raydpo's padded layout's summed completion log-probs from
transformers' plain forward (full logits, log-softmax, gather), on three pairs of uneven lengths
(sequences up to 18 tokens, past a 4-token window); then per request: the layout the model got (S:
shared prompt, P: padding-free, -: off) and the largest difference of its log-probs from the padded ones.
Exits 1 when any layout given differs by more than 1e-4. Types whose generic config does not build are
shown as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TYPES = ("llama,mistral,ministral,qwen2,qwen3,gemma,gemma2,gemma3_text,phi,phi3,gpt2,gpt_neox,opt,olmo2,olmo3,"
         "starcoder2,stablelm,cohere,cohere2,granite,smollm3,qwen3_moe,mixtral,exaone4,glm4,seed_oss,arcee,"
         "hunyuan_v1_dense,apertus")
ROWS = [{"prompt_ids": [1, 5, 6, 4, 4, 7, 8, 9, 10, 11], "chosen_ids": [7, 2, 3, 4, 5, 6, 12, 13],
         "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
        {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]},
        {"prompt_ids": [1, 5, 9], "chosen_ids": [7], "rejected_ids": [3, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5]}]
REQUESTS = ((True, False), (False, True), (True, True))  # (share_prompt, padding_free) asked for


def tiny_model(model_type: str, kernel: str, window: Optional[int] = None):
    """A tiny random model of this type from a generic config (hidden 32, 2 layers), under `kernel`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128, pad_token_id=0, initializer_range=0.5)
    if window and getattr(config, "sliding_window", None):
        config.sliding_window = window
    return AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()


def layouts(model) -> List[Tuple[str, float]]:
    """First ("--", the largest difference of raydpo's padded layout's summed completion log-probs on ROWS
    from transformers' plain forward); then per request of REQUESTS: the layout fit_to_model gives the
    model ("SP", "-P", ...) and the largest difference of its log-probs from the padded layout's."""
    import torch

    from raydpo import DPOConfig
    from raydpo.data.batching import collate
    from raydpo.logprobs import model_completion_logps
    from raydpo.model_loading import fit_to_model

    results = []
    with torch.no_grad():
        batch = collate(ROWS, 0)
        padded = model_completion_logps(model, batch)
        # raydpo's padded layout against transformers' own forward and a plain log-softmax gather (no
        # logits_to_keep, no chunked head): the first row of the table's reference
        logps = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)
        scored = logps[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0] * batch.completion_mask[:, 1:]
        results.append(("--", float((padded - scored.sum(1)).abs().max())))
        for share_prompt, padding_free in REQUESTS:
            fitted = fit_to_model(DPOConfig(output_dir="o", share_prompt=share_prompt, padding_free=padding_free,
                                            max_length=64), model)
            got = model_completion_logps(model, collate(ROWS, 0, share_prompt=fitted.share_prompt,
                                                        padding_free=fitted.padding_free))
            layout = f"{'S' if fitted.share_prompt else '-'}{'P' if fitted.padding_free else '-'}"
            results.append((layout, float((got - padded).abs().max())))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--window", type=int, default=None, help="sliding_window for configs that have one")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # fit_to_model's reasons: the table shows what each model got
    worst = 0.0
    print(f"{'model type':18s} {'kernel':6s} {'window':>6s}   padded vs plain   " + "   ".join(
        f"{'S' if s else '-'}{'P' if p else '-'} asked: got, max |diff|" for s, p in REQUESTS))
    for model_type in args.types.split(","):
        for kernel in ("sdpa", "eager"):
            try:
                model = tiny_model(model_type, kernel, args.window)
            except Exception as error:  # noqa: BLE001 - a generic config some types do not take
                print(f"{model_type:18s} {kernel:6s} skipped: {type(error).__name__}: {str(error)[:80]}")
                continue
            (_, plain), *given = layouts(model)
            cells = [f"{plain:.1e}".ljust(len("padded vs plain"))]
            for layout, diff in given:
                cells.append(f"{layout}, {diff:.1e}".ljust(len("SP asked: got, max |diff|")))
            worst = max([worst, plain] + [diff for _, diff in given])
            window = getattr(model.config.get_text_config(), "sliding_window", None)
            print(f"{model_type:18s} {kernel:6s} {str(window):>6s}   " + "   ".join(cells), flush=True)
    print(f"largest difference of a layout given: {worst:.1e}")
    sys.exit(1 if worst > 1e-4 else 0)


if __name__ == "__main__":
    main()

"""Across transformers' decoder architectures, raydpo's padded log-probs equal transformers' plain forward
(full logits, log-softmax, gather), and every batch layout raydpo gives a model (after fit_to_model's
blockers and padding-free probe) has the padded two-sequence layout's log-probs (TRL's layout,
transformers' own masks), sequences past a 4-token sliding window included; and what the models got is
what their architecture allows. bench/layout_fidelity.py prints the table. No Ray."""

import importlib.util
import logging
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "layout_fidelity.py")
spec = importlib.util.spec_from_file_location("layout_fidelity", BENCH)
layout_fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layout_fidelity)

# What each asks-for (share_prompt alone, padding_free alone, both) gets, by kernel: the whole set where
# nothing stands in the way; no shared prompt past a sliding window but in padding-free rows under sdpa;
# no padding-free rows where the probe finds sequences leaking into each other (OPT's eager mask ignores
# position ids); no gathered layout for soft-capped or scaled logits (gemma2 eager, cohere2) or an MoE
# aux loss (mixtral).
EVERY = {"sdpa": ["S-", "-P", "SP"], "eager": ["S-", "-P", "SP"]}
WINDOWED = {"sdpa": ["--", "-P", "SP"], "eager": ["--", "-P", "-P"]}
NONE = {"sdpa": ["--", "--", "--"], "eager": ["--", "--", "--"]}
EXPECTED = {
    "llama": EVERY, "qwen2": EVERY, "qwen3": EVERY, "gemma": EVERY, "phi": EVERY, "gpt2": EVERY,
    "gpt_neox": EVERY, "olmo2": EVERY, "starcoder2": EVERY, "stablelm": EVERY, "granite": EVERY,
    "smollm3": EVERY, "glm4": EVERY,
    "mistral": WINDOWED, "ministral": WINDOWED, "gemma3_text": WINDOWED, "olmo3": WINDOWED, "exaone4": WINDOWED,
    "opt": {"sdpa": ["S-", "-P", "SP"], "eager": ["S-", "--", "SP"]},
    "cohere2": NONE, "mixtral": NONE,
}


@pytest.mark.parametrize("head", ["logits", "chunked"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_every_layout_given_has_the_padded_numbers(model_type, kernel, head, monkeypatch):
    """head "chunked": the LM head runs chunk by chunk on the hidden states (logprobs._fuse_head), as it
    does for a real vocabulary, instead of through the model's logits."""
    import raydpo.logprobs

    if head == "chunked":
        monkeypatch.setattr(raydpo.logprobs, "FUSED_HEAD_BYTES", 0)
    logging.disable(logging.WARNING)
    try:
        got = layout_fidelity.layouts(layout_fidelity.tiny_model(model_type, kernel, window=4))
    finally:
        logging.disable(logging.NOTSET)
    assert [layout for layout, _ in got] == ["--"] + EXPECTED[model_type][kernel]  # "--": padded vs plain
    assert max(diff for _, diff in got) < 1e-4, got


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_the_layout_given_has_the_padded_gradients(model_type, kernel):
    """The gradients of the summed log-probs in the layout a padding-free request gets equal the padded
    layout's, to 1e-5 of the largest gradient (a per-parameter ratio would not do: a key projection's bias
    has an analytically zero gradient, which each layout rounds to its own ~1e-6)."""
    import torch

    from raydpo import DPOConfig
    from raydpo.data.batching import collate
    from raydpo.logprobs import model_completion_logps
    from raydpo.model_loading import fit_to_model

    logging.disable(logging.WARNING)
    try:
        model = layout_fidelity.tiny_model(model_type, kernel, window=4)
        fitted = fit_to_model(DPOConfig(output_dir="o", padding_free=True, max_length=64), model)
    finally:
        logging.disable(logging.NOTSET)
    assert f"{'S' if fitted.share_prompt else '-'}{'P' if fitted.padding_free else '-'}" == EXPECTED[model_type][kernel][2]

    def gradients(**layout):
        model.zero_grad(set_to_none=True)
        model_completion_logps(model, collate(layout_fidelity.ROWS, 0, **layout)).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded = gradients()
    laid_out = gradients(share_prompt=fitted.share_prompt, padding_free=fitted.padding_free)
    scale = max(float(g.abs().max()) for g in padded)
    assert len(laid_out) == len(padded)
    assert max(float((a - b).abs().max()) for a, b in zip(laid_out, padded)) <= 1e-5 * scale

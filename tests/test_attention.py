"""Which attention kernels get the shared-prompt layout's 4-D mask: sdpa and eager do; any other
implementation (flash_attention_2/3, flex_attention) falls back to the padded layout with a logged
reason, never a mask it cannot read. No Ray."""

import logging

import pytest

from raydpo import DPOConfig
from raydpo.model_loading import MASK_KERNELS, fit_to_model, load_policy


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sdpa_and_eager_keep_the_shared_prompt(tiny_model, attention, caplog):
    config = DPOConfig(output_dir="o", model_init_kwargs={"attn_implementation": attention})
    model = load_policy(tiny_model, config)
    assert model.config._attn_implementation == attention in MASK_KERNELS
    with caplog.at_level(logging.WARNING):
        assert fit_to_model(config, model).share_prompt is True
        assert fit_to_model(DPOConfig(output_dir="o", padding_free=True), model).padding_free is True
    assert "share_prompt" not in caplog.text and "padding_free" not in caplog.text


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_other_kernels_fall_back_to_the_padded_layout_and_say_why(tiny_model, attention, caplog):
    config = DPOConfig(output_dir="o")
    model = load_policy(tiny_model, config)
    model.config._attn_implementation = attention  # what from_pretrained records (its package is not installed here)
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(config, model)
    assert fitted.share_prompt is False
    assert f"attn_implementation={attention!r}" in caplog.text and "padded layout" in caplog.text
    assert fit_to_model(DPOConfig(output_dir="o", share_prompt=False), model).share_prompt is False  # nothing to say
    # padding_free keeps going: its two sequences per pair are told apart by position ids, which every
    # kernel takes (FlashAttention's variable-length path); only its shared prompt goes
    fitted = fit_to_model(DPOConfig(output_dir="o", padding_free=True), model)
    assert fitted.padding_free is True and fitted.share_prompt is False

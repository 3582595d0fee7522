"""Which attention kernels get the shared-prompt layout's 4-D mask: sdpa and eager do; any other
implementation (flash_attention_2/3, flex_attention) falls back to the padded layout with a logged
reason, never a mask it cannot read. Sliding-window models keep the padded layout's numbers in every
layout they are given, and models whose layers carry state across sequences get no gathered layout. No Ray."""

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
def test_other_kernels_fall_back_to_the_padded_layout_and_say_why(tiny_model, attention, caplog, monkeypatch):
    import raydpo.model_loading as model_loading

    # the kernels are not installed here (flex_attention compiles on a CPU): no probe forward runs; the
    # probe's own tests are below
    monkeypatch.setattr(model_loading, "layout_probe", lambda model, share_prompt, padding_free, config=None: None)
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


ROWS = [{"prompt_ids": [1, 5, 6, 4, 4, 7, 8, 9], "chosen_ids": [7, 2, 3, 4, 5, 6], "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
        {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]


def _windowed_model(attention: str, family: str = "mistral", window: int = 4):
    """A tiny random model whose attention sees `window` positions back: every layer (Mistral), or only
    its second layer (Qwen2's use_sliding_window from layer max_window_layers on)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attention)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=window, **shape)).eval()
    config = Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **shape)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("attention,family", [("sdpa", "mistral"), ("eager", "mistral"), ("sdpa", "qwen2")])
@pytest.mark.parametrize("padding_free", [False, True])
def test_sliding_window_models_get_the_padded_layouts_numbers(attention, family, padding_free, caplog):
    """A sliding-window model's log-probs in the layout fit_to_model picks equal the padded two-sequence
    layout's (TRL's), sequences longer than the window included. The shared prompt's one [B, 1, S, S] mask
    cannot carry a window, so it goes (with the reason logged), except in padding-free rows under raydpo's
    sdpa, which applies each layer's own window per segment; kept without fitting, it changes the numbers."""
    import torch

    from raydpo.data.batching import collate
    from raydpo.logprobs import model_completion_stats

    model = _windowed_model(attention, family)
    config = DPOConfig(output_dir="o", padding_free=padding_free, max_length=64)
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(config, model)
    kept = padding_free and attention == "sdpa"
    assert (fitted.share_prompt, fitted.padding_free) == (kept, padding_free)
    assert ("sliding-window attention (4 tokens)" in caplog.text) != kept

    def logps(share_prompt, free):
        with torch.no_grad():
            return model_completion_stats(model, collate(ROWS, 0, share_prompt=share_prompt, padding_free=free)).logps

    padded = logps(False, False)
    torch.testing.assert_close(logps(fitted.share_prompt, fitted.padding_free), padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps(False, True), padded, rtol=1e-5, atol=1e-5)  # two sequences per pair: exact too
    if not kept:  # what the refused layout would have given: the window ignored
        assert not torch.allclose(logps(True, padding_free), padded, atol=1e-3)


def test_a_window_no_sequence_can_reach_keeps_the_shared_prompt(caplog):
    model = _windowed_model("sdpa", window=4096)
    with caplog.at_level(logging.WARNING):
        assert fit_to_model(DPOConfig(output_dir="o", max_length=1024), model).share_prompt is True
        assert fit_to_model(DPOConfig(output_dir="o", max_length=None), model).share_prompt is False
    assert "max_length=None lets a sequence reach past the window" in caplog.text


def test_layers_that_carry_state_across_sequences_keep_the_padded_layout(caplog):
    """Linear-attention (recurrent) or mamba-hybrid layers would carry one sequence of a gathered row into
    the next: both gathered layouts go, with the layer type named."""
    model = _windowed_model("sdpa", window=4096)
    model.config.layer_types = ["linear_attention", "full_attention"]
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(DPOConfig(output_dir="o", padding_free=True), model)
    assert (fitted.share_prompt, fitted.padding_free) == (False, False)
    assert "its linear_attention layers would carry one sequence into the next" in caplog.text


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_is_tried_on_the_model_and_kept_only_where_it_gives_the_padded_numbers(attention, bf16, caplog):
    """OPT builds its eager mask without the position ids: every token of a padding-free row attended to
    the sequences before it. The probe finds it, and padding_free goes with the reason logged; under sdpa
    the segments keep the sequences apart, and it stays. With bf16 the probe runs under training's
    autocast, with its wider tolerance, and decides the same. (Weights of a trained model's scale, 0.5:
    with 0.02-scale weights the leak is 6e-2 nats, which bf16's tolerance of 2e-2 relative would not see.)"""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from raydpo.data.batching import collate
    from raydpo.logprobs import model_completion_logps

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                     attn_implementation=attention, init_std=0.5)).eval()
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(DPOConfig(output_dir="o", padding_free=True, share_prompt=False, bf16=bf16), model)
    assert fitted.padding_free is (attention == "sdpa")
    assert ("differ from its padded ones" in caplog.text) is (attention == "eager")
    with torch.no_grad():
        padded = model_completion_logps(model, collate(ROWS, 0))
        free = model_completion_logps(model, collate(ROWS, 0, padding_free=True))
    assert torch.allclose(free, padded, atol=1e-5) is (attention == "sdpa")  # what the probe saw
    assert model.training is False  # the probe left the mode as it found it
    model.train()
    fit_to_model(DPOConfig(output_dir="o", padding_free=True, share_prompt=False), model)
    assert model.training is True


def test_a_shared_prompt_that_hangs_on_padding_free_rows_is_decided_again_without_them(monkeypatch, caplog):
    """A sliding-window model under sdpa keeps its shared prompt only in padding-free rows: when the probe
    turns padding_free off, the shared prompt goes too (its dense mask would ignore the window)."""
    import raydpo.model_loading as model_loading

    model = _windowed_model("sdpa")
    config = DPOConfig(output_dir="o", padding_free=True, max_length=64)
    assert (fit_to_model(config, model).share_prompt, fit_to_model(config, model).padding_free) == (True, True)
    monkeypatch.setattr(model_loading, "layout_probe", lambda model, share_prompt, padding_free, config=None: "a probe said so")
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(config, model)
    assert (fitted.share_prompt, fitted.padding_free) == (False, False)
    assert "padding_free is off for this model: a probe said so" in caplog.text
    assert "share_prompt is off for this model: its sliding-window attention" in caplog.text


def test_a_model_that_drops_position_ids_keeps_the_padded_layout(caplog):
    """A model (custom code, say) that takes position ids and ignores them would give a shared prompt's
    rejected tokens the positions after the chosen ones: the probe finds it, and the shared prompt goes
    with the reason logged. Kept without the probe, it changes the numbers. (Weights of a trained model's
    scale: a random model with 0.02-scale weights attends almost uniformly, where positions hardly count.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydpo.data.batching import collate
    from raydpo.logprobs import model_completion_logps

    class DropsPositionIds(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                   **kwargs)

    torch.manual_seed(0)
    model = DropsPositionIds(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         attn_implementation="sdpa", initializer_range=0.5)).eval()
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(DPOConfig(output_dir="o"), model)
    assert fitted.share_prompt is False
    assert "share_prompt is off for this model: its shared-prompt log-probs differ from its padded ones" in caplog.text
    with torch.no_grad():
        padded = model_completion_logps(model, collate(ROWS, 0))
        shared = model_completion_logps(model, collate(ROWS, 0, share_prompt=True))
    assert not torch.allclose(shared, padded, atol=1e-3)


def test_a_model_that_refuses_the_layouts_inputs_keeps_the_padded_layout(caplog):
    """A forward that raises on a gathered layout's inputs (here: position ids) leaves the padded layout,
    with the model's own error in the logged reason, rather than failing the run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class RefusesPositionIds(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
            if position_ids is not None:
                raise NotImplementedError("this model computes its own positions")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                   **kwargs)

    torch.manual_seed(0)
    model = RefusesPositionIds(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_model(DPOConfig(output_dir="o", padding_free=True), model)
    assert (fitted.share_prompt, fitted.padding_free) == (False, False)
    assert "refuses the padding-free shared-prompt layout's inputs (NotImplementedError: this model computes" in caplog.text
    assert "refuses the shared-prompt layout's inputs" in caplog.text  # tried again on its own

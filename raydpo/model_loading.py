"""Loading models from a path: the policy (with a new or continued PEFT adapter), a frozen reference,
and the settings a loaded model runs with. The training workers, the reference actors and
`DPOTrainer.evaluate()` all load through here, so each gets the same model for the same path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Optional

import torch

from raydpo import precision
from raydpo.config import DPOConfig
from raydpo.logprobs import model_completion_logps, shares_prompt_safely, text_config, unwrapped
from raydpo.losses import router_aux_loss_coef
from raydpo.segment_attention import takes_segments

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
REF_ADAPTER = "ref"  # the frozen copy of a continued adapter, as TRL names it


def is_adapter_dir(path) -> bool:
    """A local PEFT adapter folder (what PeftModel.save_pretrained writes)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on (its adapter_config's base_model_name_or_path)."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def reference_model_path(model: str, ref_model: Optional[str]) -> str:
    """Where the frozen reference's weights are: ref_model, else the model itself (an adapter folder
    being continued is its own reference: that adapter, frozen, on its base; `load_model`)."""
    return ref_model if ref_model is not None else model


def is_peft_model(module) -> bool:
    # A PeftModel exists only once peft is imported: asking never imports it (seconds, for a plain model).
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, getattr(peft, "PeftModel", ()))


def add_reference_adapter(peft_model, adapter_dir: str) -> None:
    """Load the adapter at `adapter_dir` a second time into `peft_model`, frozen, as REF_ADAPTER: the
    reference of a continued adapter (TRL copies its "default" adapter into "ref"; this loads the same
    weights from the folder the policy's adapter came from). Called before DeepSpeed wraps the model, so
    ZeRO-3 shards it like the rest and the optimizer never sees it (it does not require grad)."""
    device = next(peft_model.parameters()).device
    peft_model.load_adapter(adapter_dir, adapter_name=REF_ADAPTER, is_trainable=False, torch_device=str(device))


def model_init_kwargs(config: DPOConfig) -> dict:
    """from_pretrained's keyword arguments: float32 and config.trust_remote_code unless model_init_kwargs
    says otherwise; a dtype named as text ("bfloat16", transformers 4's torch_dtype key too) becomes torch's."""
    kwargs = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code, **(config.model_init_kwargs or {})}
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


def load_model(path: str, config: DPOConfig):
    """A causal LM, or a vision-language model (an image-text-to-text model) such as Llava or Qwen2-VL.
    A PEFT adapter folder gives that adapter, frozen, on its base (a continued adapter's reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if is_adapter_dir(path):
        from peft import PeftModel

        return _prepare(PeftModel.from_pretrained(load_model(adapter_base(path), config), path), config)
    kwargs = model_init_kwargs(config)
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code).model_type
    vision = model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    if config.disable_dropout:
        _disable_dropout(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(config))
    return model


def checkpointing_kwargs(config: DPOConfig) -> dict:
    """torch.utils.checkpoint's keyword arguments: use_reentrant=False unless gradient_checkpointing_kwargs
    sets it (TRL's default; the reentrant variant needs inputs that require grad and warns without it)."""
    return {"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}


def _disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _prepare(peft_model, config: DPOConfig):
    if config.disable_dropout:  # the adapters' own dropout (lora_dropout) too
        _disable_dropout(peft_model)
    if config.gradient_checkpointing:  # frozen embeddings: checkpointed blocks need inputs that require grad
        peft_model.enable_input_require_grads()
    return peft_model


def load_policy(path: str, config: DPOConfig, peft_config=None, reference_adapter: Optional[str] = None):
    """The policy: the model at `path`; with peft_config, a new adapter on it (only the adapter
    trains); or, when `path` is a saved PEFT adapter folder, that adapter on its base, to continue.
    `reference_adapter`: an adapter folder loaded beside the trained adapter, frozen, as "ref" (the
    reference of a continued adapter, as TRL's; `PeftBaseReference(policy, REF_ADAPTER)` uses it)."""
    if is_adapter_dir(path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(adapter_base(path), config), path, is_trainable=True)
    elif peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(load_model(path, config), peft_config)
    else:
        return load_model(path, config)
    if reference_adapter is not None:
        training = model.training
        add_reference_adapter(model, reference_adapter)
        model.train(training)  # load_adapter puts the whole model in eval mode
    return _prepare(model, config)


def continued_adapter(model: str, ref_model: Optional[str]) -> Optional[str]:
    """The adapter folder whose frozen copy is the reference: `model` when it is an adapter folder being
    continued with no ref_model (TRL's "ref" adapter), else None."""
    return model if ref_model is None and is_adapter_dir(model) else None


# Attention implementations that take the shared-prompt layout's [B, 1, S, S] mask. flash_attention_2/3
# read only a 2-D padding mask (or position ids), and flex_attention builds its own block mask.
MASK_KERNELS = ("sdpa", "eager")
# transformers' layer types (config.layer_types) the gathered layouts reproduce: attention over the whole
# prefix or a sliding window of it (and the MLP kinds). Any other (linear attention, chunked or sparse
# attention, mamba hybrids) would carry state or structure across the sequences laid end to end.
GATHERED_LAYER_TYPES = ("full_attention", "sliding_attention", "dense", "sparse")


def sliding_window(config) -> Optional[int]:
    """The window of a text config's sliding-window attention layers (a query sees keys fewer than
    `window` positions back), or None when every layer attends to the whole prefix. Mistral-style configs
    window every layer; those with `layer_types` (Gemma 2/3, Qwen2 with use_sliding_window) only their
    "sliding_attention" layers."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def gathered_blocker(model, aux_loss_coef: float) -> Optional[str]:
    """Why this model cannot run the gathered layouts (shared prompt, padding-free: raydpo runs the LM
    head over the gathered positions itself), or None when it can."""
    if aux_loss_coef:
        return "an MoE load-balancing loss (router_aux_loss_coef), which TRL computes over the two-sequence layout"
    if not shares_prompt_safely(model):
        return "the model's logits are not lm_head(final hidden state) with logits_to_keep (e.g. soft-capped)"
    other = sorted(set(getattr(text_config(model), "layer_types", None) or ()) - set(GATHERED_LAYER_TYPES))
    if other:
        return (f"its {', '.join(other)} layers would carry one sequence into the next (only "
                f"{' and '.join(GATHERED_LAYER_TYPES[:2])} layers keep each to itself)")
    return None


def shared_prompt_blocker(model, aux_loss_coef: float, config: DPOConfig) -> Optional[str]:
    """Why this model cannot run the shared-prompt layout (prompt once, rejected masked off chosen: a
    [B, 1, S, S] mask), or None when it can. The padded layout is then used: the same numbers, more
    tokens per pair. `config` (max_length, padding_free) decides for sliding-window models."""
    reason = gathered_blocker(model, aux_loss_coef)
    if reason:
        return reason
    attention = getattr(text_config(model), "_attn_implementation", None) or "sdpa"
    if attention not in MASK_KERNELS:
        return (f"attn_implementation={attention!r} takes no [B, 1, S, S] attention mask (only "
                f"{' and '.join(MASK_KERNELS)} do)")
    window = sliding_window(text_config(model))
    max_length = config.max_length
    if window is not None and (max_length is None or max_length > window):
        # One [B, 1, S, S] mask goes to every layer as it is, so no layer's window would apply. Padding-free
        # rows under raydpo's sdpa are the exception: it applies each layer's window per segment.
        segments = config.padding_free and takes_segments(unwrapped(model), attention)
        if not segments:
            return (f"its sliding-window attention ({window} tokens) is not in the shared-prompt layout's "
                    f"[B, 1, S, S] mask, and max_length={max_length} lets a sequence reach past the window")
    return None


# Two small pairs of uneven lengths, token ids any vocabulary holds: layout_probe lays them out both ways.
PROBE_ROWS = ({"prompt_ids": [1, 2, 3, 4, 5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [9, 8]},
              {"prompt_ids": [3, 1], "chosen_ids": [4, 4, 5], "rejected_ids": [6, 7, 8, 9, 2]})


def layout_probe(model, share_prompt: bool, padding_free: bool, config: DPOConfig) -> Optional[str]:
    """Why this layout would not give the model the padded two-sequence layout's log-probs (TRL's), found
    by trying: PROBE_ROWS through both, one forward each (in eval mode, no gradient), or None when they
    agree. The gathered layouts rely on the model to honour what they hand it: the position ids (a
    shared prompt's rejected tokens continue from the prompt; a padding-free row's sequences restart),
    a dense mask, or raydpo's sdpa segments. A model that does not (OPT builds its eager mask without
    the position ids, so every token of a padding-free row attended to the sequences before it; a
    custom model that swallows position_ids in **kwargs) would be silently wrong, so the caller falls
    back to the padded layout. The forwards run under `config`'s autocast, as training's do
    (FlashAttention takes no float32)."""
    from raydpo.data.batching import collate

    device = next(unwrapped(model).parameters()).device
    dtype = precision.autocast_dtype(config) or next(unwrapped(model).parameters()).dtype
    training = model.training
    model.eval()  # dropout would make the two forwards differ
    name = " ".join(["padding-free"] * padding_free + ["shared-prompt"] * share_prompt)
    try:
        with torch.no_grad(), precision.autocast(config, device):
            padded = model_completion_logps(model, collate(PROBE_ROWS, 0).to(device)).float()
            try:  # the padded forward is the run's own; a model may refuse only the layout's inputs
                laid_out = model_completion_logps(model, collate(
                    PROBE_ROWS, 0, share_prompt=share_prompt, padding_free=padding_free).to(device)).float()
            except Exception as error:  # noqa: BLE001 - any refusal means: not this layout
                return f"its forward refuses the {name} layout's inputs ({type(error).__name__}: {error})"
    finally:
        model.train(training)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # relative, on sums of a few tokens' log-probs
    if torch.allclose(laid_out, padded, rtol=tolerance, atol=tolerance):
        return None
    return (f"its {name} log-probs differ from its padded ones by {float((laid_out - padded).abs().max()):.3g} "
            f"on a probe (it does not honour the layout's position ids or attention structure)")


def fit_to_model(config: DPOConfig, model) -> DPOConfig:
    """The settings this model runs with: router_aux_loss_coef resolved (TRL's rule: the field, else the
    MoE config's own; 0.0 when there is no auxiliary loss), and share_prompt and padding_free off, with a
    logged reason, where their layouts cannot run or would change the numbers: first by what the model's
    config says (the blockers above), then by trying the layout on the model (layout_probe). padding_free
    without a shared prompt takes any attention kernel (its sequences are told apart by position ids)."""
    coef = router_aux_loss_coef(text_config(model), config.router_aux_loss_coef)

    def off(field: str, reason: Optional[str], padding_free: bool = False) -> bool:
        if reason:
            logger.warning("%s is off for this model: %s; %s", field, reason, "padding-free rows hold two "
                           "sequences per pair" if padding_free else "batches use the padded layout")
        return bool(reason)

    def shares(padding_free: bool) -> bool:
        fitted = dataclasses.replace(config, padding_free=padding_free)
        return not off("share_prompt", shared_prompt_blocker(model, coef, fitted), padding_free)

    padding_free = config.padding_free and not off("padding_free", gathered_blocker(model, coef))
    share_prompt = config.share_prompt and shares(padding_free)
    # Last, the layout as it will run is tried on the model (layout_probe). Where it fails, padding_free
    # (asked for by the user) is kept without the shared prompt if that passes; else it goes, and the
    # shared prompt, which may have hung on padding-free rows (a sliding-window model's), is decided and
    # tried again on its own.
    failed = layout_probe(model, share_prompt, padding_free, config) if share_prompt or padding_free else None
    if failed and share_prompt and padding_free and not layout_probe(model, False, True, config):
        share_prompt = not off("share_prompt", failed, padding_free=True)
    elif failed:
        if padding_free:
            padding_free = not off("padding_free", failed)
            share_prompt = config.share_prompt and shares(False)
            failed = layout_probe(model, True, False, config) if share_prompt else None
        if share_prompt and failed:
            share_prompt = not off("share_prompt", failed)
    if (coef, share_prompt, padding_free) == (config.router_aux_loss_coef, config.share_prompt, config.padding_free):
        return config
    return dataclasses.replace(config, router_aux_loss_coef=coef, share_prompt=share_prompt, padding_free=padding_free)

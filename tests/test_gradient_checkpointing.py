"""Gradient checkpointing (DPOConfig.gradient_checkpointing, _kwargs): the fp32 first step's loss and
gradients equal those without it, within 1e-5, for the reentrant and the non-reentrant variant. No Ray:
the loop's own model loading, batch, reference and DPO step, on one process."""

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.tokenize import tokenize_row
from raydpo.model_loading import checkpointing_kwargs, load_model, load_policy
from raydpo.reference import InWorkerReference
from raydpo.train.step import dpo_step, grad_norm, make_batch
from raydpo.train.trainer import load_tokenizer


def first_step(model_path, rows, **overrides):
    config = DPOConfig(output_dir="unused", max_length=32, report_to="none", **overrides)
    torch.manual_seed(0)
    policy = load_policy(model_path, config)
    policy.train()  # checkpointing is active in training mode only
    reference = InWorkerReference(load_model(model_path, DPOConfig(output_dir="unused")), {})
    tokenizer = load_tokenizer(model_path)
    batch = make_batch([tokenize_row(tokenizer, row) for row in rows], config, tokenizer,
                       tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    loss, _, _ = dpo_step(policy, reference, batch, config)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in policy.named_parameters() if p.grad is not None}
    return policy, float(loss), grad_norm(policy), grads


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
@pytest.mark.parametrize("layout", [{}, {"padding_free": True}])  # padding-free: the recompute gets the segments too
def test_checkpointing_changes_no_number_of_the_first_step(tiny_model, parity_rows, kwargs, layout):
    rows = parity_rows[:4]
    _, loss, norm, grads = first_step(tiny_model, rows)
    policy, loss_gc, norm_gc, grads_gc = first_step(tiny_model, rows, gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs=kwargs, **layout)
    assert policy.is_gradient_checkpointing
    assert norm > 0 and loss_gc == pytest.approx(loss, abs=1e-5) and norm_gc == pytest.approx(norm, abs=1e-5)
    assert grads.keys() == grads_gc.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-5, rtol=0, msg=name)


def test_use_reentrant_is_false_unless_set_and_bad_kwargs_are_refused():
    assert checkpointing_kwargs(DPOConfig(output_dir="o")) == {"use_reentrant": False}
    config = DPOConfig(output_dir="o", gradient_checkpointing_kwargs='{"use_reentrant": true}')  # a CLI flag
    assert checkpointing_kwargs(config) == {"use_reentrant": True}
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs"):
        DPOConfig(output_dir="o", gradient_checkpointing_kwargs="[1]")

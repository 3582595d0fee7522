"""Checkpoints: DeepSpeed state + loop position + RNG, and a Hugging Face export of the policy.

Layout of one checkpoint folder (all workers' files merged by Ray Train):
  deepspeed/          engine.save_checkpoint (weights, optimizer, LR scheduler; sharded under ZeRO)
  rng_rank{r}.pt      each worker's torch RNG state
  model/              the policy as a plain transformers folder, with the tokenizer
  reference/          with sync_ref_model (TR-DPO) only: the moving reference, as a transformers folder
"""

from __future__ import annotations

import contextlib
import os

import torch

from raydpo.model_loading import is_peft_model, reference_model_path
from raydpo.train.deepspeed import zero_stage
from raydpo.train.spec import ResumeState

DS_TAG = "deepspeed"
MODEL_DIR = "model"
REFERENCE_DIR = "reference"


def save(engine, directory: str, rank: int, ds_config: dict, tokenizer, state: ResumeState, reference=None):
    """`reference`: an InWorkerReference that TR-DPO updates, saved so a restart continues from it."""
    engine.save_checkpoint(directory, tag=DS_TAG, client_state=state.client_state())
    torch.save(torch.get_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
    export_model(engine, os.path.join(directory, MODEL_DIR), rank, ds_config, tokenizer)
    if reference is not None:
        state_dict = reference.state_dict(rank)
        if rank == 0:
            reference.model.save_pretrained(os.path.join(directory, REFERENCE_DIR), state_dict=state_dict)


def reference_path(model, ref_model, config, directory=None) -> str:
    """Where the run's reference model is: ref_model, else the initial model; with TR-DPO
    (sync_ref_model) the reference a checkpoint `directory` saved, as it had moved by then."""
    path = reference_model_path(model, ref_model)
    return (saved_reference(directory) or path) if config.sync_ref_model else path


def saved_reference(directory) -> str | None:
    """The TR-DPO reference folder of a checkpoint, if it has one."""
    path = os.path.join(directory, REFERENCE_DIR) if directory else None
    return path if path and os.path.isdir(path) else None


def _deepspeed_checkpoint_globals() -> list:
    """The only non-tensor classes DeepSpeed puts in its checkpoint files (found by loading ZeRO 0-3
    checkpoints with weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads(engine):
    """DeepSpeed unpickles checkpoint files with weights_only=False; a checkpoint on shared storage
    is not trusted code, so load with weights_only=True and an allowlist instead."""
    checkpoint_engine = engine.checkpoint_engine
    unsafe_load = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: torch.load(path, map_location=map_location,
                                                                       weights_only=True)
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        checkpoint_engine.load = unsafe_load


def restore(engine, directory: str, rank: int) -> ResumeState:
    """Load engine state and this worker's RNG; returns where the loop was when it was saved."""
    with _weights_only_loads(engine):
        _, client_state = engine.load_checkpoint(directory, tag=DS_TAG)
    if client_state is None:
        raise ValueError(f"{directory} holds no raydpo DeepSpeed checkpoint (looked for tag {DS_TAG!r})")
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        torch.set_rng_state(torch.load(rng_path, weights_only=True))
    return ResumeState.from_client_state(client_state)


def export_model(engine, directory: str, rank: int, ds_config: dict, tokenizer):
    """Write the policy so plain `AutoModelForCausalLM.from_pretrained(directory)` loads it.

    Under ZeRO-3 every worker must take part: the shards are gathered to rank 0.
    """
    if zero_stage(ds_config) == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # full-precision when training in fp32
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        module = engine.module
        # PEFT: the trained adapter only, not a continued adapter's frozen "ref" copy beside it
        adapters = {"selected_adapters": [module.active_adapter]} if is_peft_model(module) else {}
        module.save_pretrained(directory, state_dict=state_dict, **adapters)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

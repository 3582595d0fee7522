"""Every module and batch tensor a training worker uses is on its engine's device, and every model in
the run's compute dtype. Runnable on a CPU-only machine: the "meta" device stands for the accelerator,
so a module or tensor left behind is on "cpu"."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.batching import Batch
from raydpo.data.tokenize import tokenize_row
from raydpo.model_loading import load_policy
from raydpo.reference.precompute import ReferenceLogps
from raydpo.train.loop import build_reference
from raydpo.train.spec import WorkerSpec, training_plan
from raydpo.train.step import make_batch
from raydpo.train.trainer import load_tokenizer

ACCELERATOR = torch.device("meta")


def tensors(batch: Batch) -> dict:
    found = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return {**found, **{f"images.{name}": value for name, value in batch.images.items()}}


@pytest.mark.parametrize("options, dtype", [({"bf16": False}, torch.float32), ({"bf16": True}, torch.float32),
                                            ({"bf16": True, "deepspeed": {"bf16": {"enabled": True}}}, torch.bfloat16)])
def test_the_in_worker_reference_joins_the_policy_on_the_engine_device(tiny_model, options, dtype):
    """On the engine's device, its weights in the policy's dtype (bf16: float32 under autocast, unless the
    DeepSpeed dict asks for its bf16 weights): under ZeRO 0-2 DeepSpeed casts only the policy."""
    config = DPOConfig(output_dir="unused", report_to="none", **options)
    engine = SimpleNamespace(device=ACCELERATOR, module=load_policy(tiny_model, config).to(ACCELERATOR))
    spec = WorkerSpec(config=config.to_dict(), plan=training_plan(8, config), model=tiny_model, ref_model=tiny_model,
                      tokenizer=None, pad_token_id=0)
    for ds_config in ({}, {"zero_optimization": {"stage": 2}}):  # ZeRO 0-2: placed by raydpo, not DeepSpeed
        ds_config = {**(config.deepspeed or {}), **ds_config}
        reference = build_reference(spec, config, ds_config, engine)
        placed = {t.device for t in [*reference.model.parameters(), *reference.model.buffers()]}
        assert placed == {ACCELERATOR}, ds_config
        assert {p.dtype for p in reference.model.parameters()} == {dtype}, ds_config
        # cast as DeepSpeed casts the policy: parameters only, so RoPE's float32 inv_freq stays float32
        # in both and the reference computes exactly what the policy does before the first update
        assert {n: b.dtype for n, b in reference.model.named_buffers()} == \
            {n: b.dtype for n, b in engine.module.named_buffers()}
        assert reference.model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("options, dtype", [({}, torch.float32), ({"bf16": True}, torch.float32),
                                            ({"deepspeed": {"bf16": {"enabled": True}}}, torch.bfloat16)])
def test_reference_actors_compute_in_the_workers_dtype(tiny_model, options, dtype):
    """The precompute and streamed actors (one class) resolve precision as a training worker does."""
    config = DPOConfig(output_dir="unused", report_to="none", use_gpu=False, **options)
    actor = ReferenceLogps(tiny_model, dataclasses.asdict(config), pad_token_id=0)
    assert {p.dtype for p in actor.model.parameters()} == {dtype}


@pytest.mark.parametrize("gpu_ids, device", [(["3"], torch.device("cuda", 0)), ([], torch.device("cpu"))])
def test_reference_actors_use_the_gpu_ray_gave_them(monkeypatch, tiny_model, gpu_ids, device):
    """Ray shows an actor only the GPU it gave it, a fraction of one included (CUDA_VISIBLE_DEVICES), so a
    GPU actor puts the reference on cuda:0. An actor asked for CPUs only may still see the node's GPUs: it
    stays on the CPU."""
    import ray

    from raydpo.reference import precompute

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    placed = []
    monkeypatch.setattr(precompute.precision, "place", lambda model, to, dtype: placed.append(to) or model)
    config = DPOConfig(output_dir="unused", report_to="none", use_gpu=True, bf16=False)
    actor = ReferenceLogps(tiny_model, dataclasses.asdict(config), pad_token_id=0)
    assert placed == [device] and actor.device == device


@pytest.mark.parametrize("share_prompt", [False, True])
def test_every_batch_tensor_moves_to_the_engine_device(tiny_model, parity_rows, share_prompt):
    config = DPOConfig(output_dir="unused", report_to="none", max_length=32, share_prompt=share_prompt, ld_alpha=0.5)
    tokenizer = load_tokenizer(tiny_model)
    rows = [{**tokenize_row(tokenizer, row), "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
            for row in parity_rows[:4]]
    batch = make_batch(rows, config, tokenizer, tokenizer.eos_token_id)
    batch = dataclasses.replace(batch, images={"pixel_values": torch.zeros(4, 3, 2, 2)})  # a vision batch's inputs
    on_cpu = tensors(batch)
    assert {"ref_logps", "logp_weights", "images.pixel_values"} <= on_cpu.keys()
    assert share_prompt == ("gather_index" in on_cpu and "position_ids" in on_cpu)
    moved = tensors(batch.to(ACCELERATOR))
    assert moved.keys() == on_cpu.keys()
    assert {name for name, value in moved.items() if value.device != ACCELERATOR} == set()


def test_use_gpu_none_means_gpus_when_the_cluster_has_them(fake_cluster):
    from raydpo import cluster

    fake_cluster({"CPU": 16.0, "GPU": 8.0})
    assert DPOConfig(output_dir="o").use_gpu is None
    assert cluster.resolve_use_gpu(DPOConfig(output_dir="o")).use_gpu is True
    assert cluster.resolve_use_gpu(DPOConfig(output_dir="o", use_gpu=False)).use_gpu is False  # asked: kept
    fake_cluster({"CPU": 2.0})
    assert cluster.resolve_use_gpu(DPOConfig(output_dir="o")).use_gpu is False

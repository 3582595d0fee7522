"""Mixed precision with TRL's field names (bf16, fp16, tf32): checks, resolution, DeepSpeed's sections."""

import dataclasses
import json

import pytest
import torch

from raydpo import DPOConfig, precision
from raydpo.train.deepspeed import build_deepspeed_config, reference_deepspeed_config


def config(**options):
    return DPOConfig(output_dir="unused", report_to="none", **options)


def test_gradient_checkpointing_none_is_trls_true_on_gpus_only():
    assert config().gradient_checkpointing is None
    assert precision.resolve(config(), on_gpu=True).gradient_checkpointing is True
    assert precision.resolve(config(), on_gpu=False).gradient_checkpointing is False
    assert precision.resolve(config(gradient_checkpointing=True), on_gpu=False).gradient_checkpointing is True


def test_fp16_on_a_cpu_without_float16_is_refused_by_name(monkeypatch):
    """DeepSpeed's CPU accelerator refuses fp16 where oneDNN has no float16 kernels (CPUs without
    AVX512-FP16 or AMX-FP16); raydpo says so first, naming the field and what to use."""
    monkeypatch.setattr(precision, "cpu_has_fp16", lambda: False)
    with pytest.raises(ValueError, match="fp16=True: this CPU worker has no float16 arithmetic.*use bf16=True"):
        precision.resolve(config(fp16=True), on_gpu=False)
    assert precision.resolve(config(fp16=True), on_gpu=True).fp16 is True  # a GPU's float16 is not asked about
    monkeypatch.setattr(precision, "cpu_has_fp16", lambda: True)
    assert precision.resolve(config(fp16=True), on_gpu=False).fp16 is True
    monkeypatch.undo()
    assert precision.cpu_has_fp16() == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def test_bf16_none_resolves_per_device_and_follows_the_deepspeed_config(monkeypatch):
    assert config().bf16 is None  # unresolved until a process knows its device
    assert precision.resolve(config(), on_gpu=False).bf16 is False  # CPU workers stay in float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert precision.resolve(config(), on_gpu=True).bf16 is True  # TRL's default on a bf16 GPU
    assert precision.resolve(config(fp16=True), on_gpu=True).bf16 is False
    assert precision.resolve(config(deepspeed={"bf16": {"enabled": True}}), on_gpu=False).bf16 is True
    assert precision.resolve(config(deepspeed={"bf16": {"enabled": False}}), on_gpu=True).bf16 is False
    assert precision.resolve(config(bf16=False), on_gpu=True).bf16 is False  # asked: kept
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert precision.resolve(config(), on_gpu=True).bf16 is False


@pytest.mark.parametrize("options, named", [
    (dict(bf16=True, fp16=True), "bf16 and DPOConfig.fp16 cannot both"),
    (dict(bf16=False, deepspeed={"bf16": {"enabled": True}}), "bf16=False contradicts .* bf16.enabled=True"),
    (dict(deepspeed={"torch_autocast": {"enabled": True}}), "set bf16=True instead of a torch_autocast section"),
    (dict(fp16=False, deepspeed={"fp16": {"enabled": True}}), "fp16=False contradicts .* fp16.enabled=True"),
    (dict(fp16=True, deepspeed={"fp16": {"enabled": False}}), "fp16=True contradicts .* fp16.enabled=False"),
    (dict(tf32=True, use_gpu=False), "tf32=True needs GPU workers"),
])
def test_contradictions_are_errors_naming_both(options, named):
    with pytest.raises(ValueError, match=named):
        config(**options)


def test_a_deepspeed_file_is_checked_too(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="bf16=False contradicts"):
        config(bf16=False, deepspeed=str(path))
    assert config(bf16=True, deepspeed=str(path)).bf16 is True


def test_tf32_on_a_cluster_without_gpus_is_refused(fake_cluster):
    from raydpo import cluster

    fake_cluster({"CPU": 2.0})
    with pytest.raises(ValueError, match="tf32=True needs GPU workers"):
        cluster.resolve_use_gpu(config(tf32=True))


@pytest.mark.parametrize("options, bf16, fp16, autocast, weights", [
    (dict(bf16=False), False, False, None, torch.float32),
    # TRL's single-process bf16: float32 weights under autocast, gradients reduced in float32
    (dict(bf16=True), False, False, torch.bfloat16, torch.float32),
    (dict(bf16=False, fp16=True), False, True, None, torch.float16),
    (dict(bf16=True, deepspeed={"bf16": {"enabled": "auto"}, "fp16": {"initial_scale_power": 12}}), False, False,
     torch.bfloat16, torch.float32),
    # DeepSpeed's own bf16 when its dict asks for it: bf16 weights, float32 master weights
    (dict(bf16=True, deepspeed={"bf16": {"enabled": True}}), True, False, None, torch.bfloat16),
])
def test_deepspeed_sections_and_the_dtypes(options, bf16, fp16, autocast, weights, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fp16", lambda: True)  # fp16's sections, whatever this CPU has
    resolved = precision.resolve(config(**options), on_gpu=False)
    ds = build_deepspeed_config(resolved, world_size=2)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    assert precision.autocast_dtype(resolved) == autocast and precision.weights_dtype(resolved) == weights
    assert precision.compute_dtype(resolved) == (autocast or weights)
    if autocast:
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    else:
        assert "torch_autocast" not in ds
    reference = reference_deepspeed_config(ds)  # a ZeRO-3 reference computes as the policy does
    assert (reference["bf16"], reference["fp16"], reference.get("torch_autocast")) == \
        (ds["bf16"], ds["fp16"], ds.get("torch_autocast"))
    if "fp16" in options.get("deepspeed", {}):  # the user's other settings in a section stay
        assert ds["fp16"]["initial_scale_power"] == 12


def test_autocast_runs_matmuls_in_bf16_only_under_autocast():
    weights = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast(precision.resolve(config(bf16=True), on_gpu=False), "cpu"):
        assert weights(x).dtype == torch.bfloat16
    with precision.autocast(precision.resolve(config(bf16=True, deepspeed={"bf16": {"enabled": True}}),
                                              on_gpu=False), "cpu"):
        assert weights(x).dtype == torch.float32  # DeepSpeed's bf16 casts the weights instead


def test_place_casts_to_the_weights_dtype_and_leaves_a_chosen_dtype_under_float32():
    model = torch.nn.Linear(2, 2)
    assert precision.place(model, "cpu", torch.bfloat16).weight.dtype == torch.bfloat16
    chosen = torch.nn.Linear(2, 2).to(torch.bfloat16)  # model_init_kwargs {"dtype": "bfloat16"}, fp32 training
    assert precision.place(chosen, "cpu", torch.float32).weight.dtype == torch.bfloat16


def test_the_config_round_trips_through_a_dict():
    resolved = precision.resolve(config(deepspeed={"bf16": {"enabled": True}}), on_gpu=False)
    assert DPOConfig(**dataclasses.asdict(resolved)).bf16 is True

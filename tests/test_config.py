import pytest

from raydpo import DPOConfig
from raydpo.config import config_from_dict


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.0), ("beta", -1.0), ("per_device_train_batch_size", 0), ("max_steps", -5),
    ("truncation_mode", "middle"), ("lr_scheduler_type", "zigzag"), ("zero_stage", 4), ("loss_type", "nope"),
    ("max_length", 1), ("warmup_ratio", 2.0), ("num_workers", -1), ("deepspeed", "/no/such/ds.json"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DPOConfig(**{field: value})


def test_local_mode_is_one_process_that_nothing_restarts():
    """num_workers=0 is Ray Train's local mode: one process's batches, and no restart to ask for."""
    from raydpo.train.spec import training_plan

    local = DPOConfig(num_workers=0, per_device_train_batch_size=4)
    assert local.world_size == 1 and DPOConfig(num_workers=3).world_size == 3
    assert training_plan(40, local) == training_plan(40, DPOConfig(num_workers=1, per_device_train_batch_size=4))
    with pytest.raises(ValueError, match="max_failures=2 needs workers: with num_workers=0"):
        DPOConfig(num_workers=0, max_failures=2)
    from raydpo.tune.sweep import sweep

    with pytest.raises(ValueError, match="num_workers=0 .local mode. is for single runs"):
        sweep("model", [{"prompt": "p", "chosen": "a", "rejected": "b"}], {"beta": [0.1]}, args=local)
    from raydpo.train.trainer import fit

    # Refused before Ray is touched: no actor or pool is started for a run that cannot go on.
    with pytest.raises(ValueError, match="Ray Train callbacks need workers: with num_workers=0"):
        fit(local, "model", None, None, None, callbacks=[object()])


def test_loss_weights_length_must_match():
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(loss_type=["sigmoid"], loss_weights=[0.5, 0.5])


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="betta"):
        config_from_dict({"betta": 0.1})


def test_deepspeed_config_fills_auto_and_keeps_user_values():
    from raydpo.train.deepspeed import build_deepspeed_config

    cfg = DPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5,
                    deepspeed={"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"})
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3  # the user's stage wins over zero_stage
    assert build_deepspeed_config(DPOConfig(zero_stage=1), 1)["zero_optimization"]["stage"] == 1


def test_zero_stage_defaults_to_0_alone_and_2_with_several_workers():
    from raydpo.train.deepspeed import build_deepspeed_config

    assert build_deepspeed_config(DPOConfig(), 1)["zero_optimization"]["stage"] == 0
    assert build_deepspeed_config(DPOConfig(num_workers=2), 2)["zero_optimization"]["stage"] == 2


def test_a_token_budget_needs_padding_free_and_losses_that_add_up_by_piece():
    assert DPOConfig(padding_free=True, padding_free_max_tokens=4096).padding_free_max_tokens == 4096
    assert DPOConfig(padding_free=True, padding_free_max_tokens=4096, loss_type=["sigmoid", "sft"]).loss_types
    with pytest.raises(ValueError, match="padding_free_max_tokens is a budget for padding-free rows"):
        DPOConfig(padding_free_max_tokens=4096)
    with pytest.raises(ValueError, match="padding_free_max_tokens must be >= 1"):
        DPOConfig(padding_free=True, padding_free_max_tokens=0)
    for loss_type in ("aot", "aot_unpaired"):  # they sort the whole micro-batch
        with pytest.raises(ValueError, match=r"padding_free_max_tokens cannot be combined with loss_type \['aot"):
            DPOConfig(padding_free=True, padding_free_max_tokens=4096, loss_type=loss_type)
    with pytest.raises(ValueError, match=r"loss_type \['sft'\] and use_weighting"):
        DPOConfig(padding_free=True, padding_free_max_tokens=4096, loss_type=["sigmoid", "sft"], use_weighting=True)

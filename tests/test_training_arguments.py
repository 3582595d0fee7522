"""TrainingArguments semantics as transformers 5 defines them, without Ray: step counts given as ratios,
the schedule's decisions, the optimizer and its parameter groups, and the config's errors. transformers'
own TrainingArguments / TrainerState / Trainer are the oracle where they can be called directly."""

import pytest
import torch

from raydpo import DPOConfig
from raydpo.train.deepspeed import build_deepspeed_config, build_optimizer, param_groups
from raydpo.train.schedule import EarlyStopping, log_due, resolve_ratios, save_due, warmup_steps


def transformers_steps(total_steps: int, **values) -> dict:
    """What transformers' Trainer resolves these TrainingArguments to for a run of total_steps."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import TrainerState

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **values)
    state = TrainerState()
    state.compute_steps(args, total_steps)
    return {"warmup_steps": args.get_warmup_steps(total_steps), "logging_steps": state.logging_steps,
            "eval_steps": state.eval_steps, "save_steps": state.save_steps}


@pytest.mark.parametrize("total, values", [
    (5, dict(warmup_steps=0.34, logging_steps=0.2, save_steps=0.5, eval_steps=0.25)),
    (7, dict(warmup_steps=3, logging_steps=0.01, save_steps=0.999, eval_steps=0.5)),
    (100, dict(warmup_steps=2.7, logging_steps=10, save_steps=0.3)),  # eval_steps None: logging_steps
    (9, dict(warmup_steps=0.0, logging_steps=1.0, save_steps=4.0, eval_steps=0.1)),
])
def test_ratios_resolve_as_transformers_does(total, values):
    expected = transformers_steps(total, eval_strategy="steps", **values)
    config = DPOConfig(eval_strategy="steps", **values)
    resolved = resolve_ratios(config, total)
    ours = {"warmup_steps": warmup_steps(config, total), "logging_steps": resolved.logging_steps,
            "eval_steps": resolved.eval_interval, "save_steps": resolved.save_steps}
    assert ours == expected
    assert all(isinstance(v, int) for v in ours.values())
    assert config.logging_steps == values["logging_steps"]  # the user's config is left as given


def test_warmup_ratio_is_the_fallback_when_warmup_steps_is_0():
    assert warmup_steps(DPOConfig(warmup_ratio=0.25), 10) == 3
    assert warmup_steps(DPOConfig(warmup_steps=0.34, warmup_ratio=0.9), 10) == 4


def test_schedule_decisions():
    first = DPOConfig(logging_steps=5, logging_first_step=True)
    assert [s for s in range(1, 12) if log_due(s, first, last=s == 11)] == [1, 5, 10, 11]
    assert [s for s in range(1, 12) if log_due(s, DPOConfig(logging_steps=5), last=False)] == [5, 10]

    def saves(config, steps=9, steps_per_epoch=4, evaluated=(), best=()):
        return [s for s in range(1, steps + 1)
                if save_due(s, config, steps_per_epoch, last=s == steps, evaluated=s in evaluated, new_best=s in best)]

    assert saves(DPOConfig(save_steps=3)) == [3, 6, 9]
    assert saves(DPOConfig(save_strategy="epoch")) == [4, 8, 9]
    assert saves(DPOConfig(save_strategy="no")) == []
    best = DPOConfig(save_strategy="best", eval_strategy="steps", eval_steps=2)
    assert saves(best, evaluated=(2, 4, 6, 8, 9), best=(2, 6)) == [2, 6, 9]  # new bests, and the last step
    at_each_eval = DPOConfig(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)
    assert saves(at_each_eval, evaluated=(4, 8, 9)) == [4, 8, 9]


def test_new_best_follows_the_metric():
    stopper = EarlyStopping(DPOConfig(eval_strategy="steps"))
    flags = []
    for value in (1.0, 1.2, 0.9, float("nan"), 0.9, 0.5):
        stopper.update({"eval_loss": value})
        flags.append(stopper.new_best)
    assert flags == [True, False, True, False, False, True]  # strictly better, as transformers' _determine_best_metric


def test_param_groups_exempt_biases_and_norms_as_trainer_does():
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    model.transformer.wpe.weight.requires_grad_(False)  # frozen parameters are in no group
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.wte.weight" in decayed
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= exempt
    assert "transformer.wpe.weight" not in decayed | exempt
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | exempt == trainable and not decayed & exempt
    assert decayed == set(Trainer.get_decay_parameter_names(None, model)) & trainable
    assert "weight_decay" not in param_groups(model)[0]  # a DeepSpeed "optimizer" section's own value applies


@pytest.mark.parametrize("optim, cls, defaults", [
    ("adamw_torch", "AdamW", {"fused": None, "betas": (0.8, 0.99), "eps": 1e-7}),
    ("adamw_torch_fused", "AdamW", {"fused": True, "betas": (0.8, 0.99)}),
    ("sgd", "SGD", {"momentum": 0}),
    ("adafactor", "Adafactor", {"scale_parameter": False, "relative_step": False}),
])
def test_optim_builds_trainers_optimizer(optim, cls, defaults):
    config = DPOConfig(optim=optim, learning_rate=2e-3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)
    groups = [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.1},
              {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0}]
    optimizer = build_optimizer(config, groups)
    assert type(optimizer).__name__ == cls and optimizer.defaults["lr"] == 2e-3
    assert {k: optimizer.defaults[k] for k in defaults} == defaults
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_default_optim_is_transformers_default():
    from transformers import TrainingArguments

    assert DPOConfig().optim == TrainingArguments(output_dir="unused", use_cpu=True).optim.value


def test_deepspeed_optimizer_section_rule():
    plain = build_deepspeed_config(DPOConfig(), 1)
    assert "optimizer" not in plain and plain["zero_allow_untested_optimizer"]  # raydpo builds `optim`
    user = build_deepspeed_config(DPOConfig(optim="sgd", learning_rate=3e-4, deepspeed={
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.05}}}), 1)
    assert user["optimizer"]["type"] == "AdamW"  # the user's section wins over optim
    assert user["optimizer"]["params"]["lr"] == 3e-4 and user["optimizer"]["params"]["weight_decay"] == 0.05
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert build_deepspeed_config(DPOConfig(deepspeed=offload), 2)["optimizer"]["type"] == "AdamW"  # CPU Adam
    assert "optimizer" not in build_deepspeed_config(DPOConfig(optim="adafactor", deepspeed=offload), 2)


@pytest.mark.parametrize("values, message", [
    (dict(optim="adamw_8bit"), "optim must be one of .* got 'adamw_8bit'"),
    (dict(save_strategy="sometimes"), "save_strategy must be one of .* got 'sometimes'"),
    (dict(logging_steps=1.5), "logging_steps must be an integer when > 1"),
    (dict(save_steps=0), "save_steps must be an int >= 1 or a ratio"),
    (dict(eval_steps=-0.5), "eval_steps must be an int >= 1 or a ratio"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(lr_scheduler_kwargs="min_lr_rate=0.1"), "lr_scheduler_kwargs must be a dict"),
    (dict(save_strategy="best"), "save_strategy='best' .* eval_strategy"),
    (dict(eval_strategy="steps", save_strategy="epoch", load_best_model_at_end=True),
     "load_best_model_at_end requires save_strategy to match eval_strategy"),
    (dict(eval_strategy="steps", eval_steps=0.3, save_steps=10, load_best_model_at_end=True),
     "mixing a ratio and a step count"),
    (dict(eval_strategy="steps", eval_steps=0.2, save_steps=0.3, load_best_model_at_end=True),
     "multiple of eval_steps"),
])
def test_bad_training_arguments_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**values)


def test_transformers_accepts_what_raydpo_accepts():
    """The same combinations pass both: ratios that are multiples, and save_strategy='best'."""
    from transformers import TrainingArguments

    for values in (dict(eval_strategy="steps", eval_steps=0.2, save_steps=0.4, load_best_model_at_end=True),
                   dict(eval_strategy="steps", save_strategy="best", load_best_model_at_end=True),
                   dict(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)):
        DPOConfig(**values)
        TrainingArguments(output_dir="unused", use_cpu=True, **values)


def test_bad_lr_scheduler_kwargs_fail_on_the_driver_naming_the_field():
    from raydpo.train.deepspeed import check_lr_scheduler

    check_lr_scheduler(DPOConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-7}), 10)
    check_lr_scheduler(DPOConfig(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 3}), 10)
    with pytest.raises(ValueError, match="lr_scheduler_kwargs .* 'cosine_with_min_lr'"):
        check_lr_scheduler(DPOConfig(lr_scheduler_type="cosine_with_min_lr"), 10)
    with pytest.raises(ValueError, match="lr_scheduler_kwargs .*unexpected keyword argument 'min_lr_ratio'"):
        check_lr_scheduler(DPOConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_ratio": 0.1}),
                           10)

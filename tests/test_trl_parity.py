"""TRL 1.16's DPOTrainer and raydpo, same model, reference model and rows: the first logged step's
loss and metrics agree to 1e-4 relative, for every loss type and option, with raydpo's shared-prompt
batches (its default) and once with TRL's two-sequence layout.

TRL runs for real (one optimizer step on one batch, so its shuffle does not matter). raydpo's side is
the worker's own step (`dpo_step`, the metrics window, the pre-clip gradient norm) in-process: the Ray
path around it is checked against this same step elsewhere (test_losses_e2e, test_train_e2e). The
reference is a second model with other weights, so the rewards are not all zero.
"""

import math
import os

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.batching import PADDED, PADDING_FREE, SHARED_PROMPT, token_counts
from raydpo.data.tokenize import tokenize_row
from raydpo.losses import LOSSES
from raydpo.reference import InWorkerReference
from raydpo.model_loading import load_model
from raydpo.train.step import dpo_step, grad_norm, make_batch
from raydpo.train.metrics import MetricsWindow


COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens",
            "grad_norm"]
SMOOTHED = {"exo_pair": 1e-3, "robust": 0.1}


def cases():
    yield from ({"loss_type": name, "label_smoothing": SMOOTHED.get(name, 0.0)} for name in sorted(LOSSES))
    yield {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}  # MPO
    yield {"loss_type": "sigmoid", "label_smoothing": 0.2}
    yield {"loss_type": "hinge", "f_divergence_type": "js_divergence"}
    yield {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}
    yield {"loss_type": "sigmoid", "ld_alpha": 0.5}
    yield {"loss_type": "sigmoid", "use_weighting": True}
    yield {"loss_type": "discopop", "discopop_tau": 0.1}
    yield {"loss_type": "ipo", "share_prompt": False}  # the two-sequence layout (every other case shares)


@pytest.fixture(scope="module")
def reference_model(tiny_model, parity_rows, tmp_path_factory):
    """The tiny model's twin: the same tokenizer (trained on the same texts), other random weights."""
    from raydpo.models import build_tiny_model

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in parity_rows] + ["0 1 2 3 4 5 6 7 8 9 even odd"]
    return build_tiny_model(tmp_path_factory.mktemp("reference"), texts, seed=7)


def trl_first_step(model_path, ref_path, rows, options, output_dir) -> dict:
    options = {"bf16": False, **{k: v for k, v in options.items() if k != "share_prompt"}}  # share_prompt: raydpo's alone
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    args = TRLConfig(output_dir=output_dir, per_device_train_batch_size=len(rows), max_steps=1, logging_steps=1,
                     learning_rate=1e-3, max_length=32, report_to="none", save_strategy="no", use_cpu=True,
                     seed=0, disable_tqdm=True, **options)
    trainer = TRLTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_path), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.train()
    return trainer.state.log_history[0]


def raydpo_first_step(model_path, ref_path, rows, options) -> dict:
    from transformers import AutoTokenizer

    config = DPOConfig(max_length=32, per_device_train_batch_size=len(rows), **options)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = make_batch([tokenize_row(tokenizer, row) for row in rows], config, tokenizer, tokenizer.pad_token_id)
    assert batch.layout == (PADDING_FREE if config.padding_free else SHARED_PROMPT if config.share_prompt else PADDED)
    policy = load_model(model_path, config)
    reference = InWorkerReference(load_model(ref_path, config), {})
    loss, per_pair, per_token = dpo_step(policy, reference, batch, config)
    loss.backward()
    window = MetricsWindow()
    window.add(loss, per_pair, per_token, token_counts(batch))
    return {**window.reduce(), "grad_norm": grad_norm(policy)}


@pytest.mark.parametrize("options", list(cases()), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_first_step_matches_trl(tiny_model, reference_model, parity_rows, tmp_path, options):
    torch.manual_seed(0)
    rows = parity_rows[:4]
    theirs = trl_first_step(tiny_model, reference_model, rows, options, str(tmp_path))
    for padding_free in (False, True):  # raydpo's padding-free layout against TRL's padded one
        ours = raydpo_first_step(tiny_model, reference_model, rows, {**options, "padding_free": padding_free})
        for name in COMPARED:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), (name, padding_free)
    assert theirs["rewards/margins"] != 0.0  # a real comparison: policy and reference differ


@pytest.fixture(scope="module")
def windowed_models(tiny_model, tmp_path_factory):
    """A tiny Mistral that attends 4 positions back (every layer), and its twin with other weights, with
    the tiny model's tokenizer: the parity rows' sequences are longer than the window."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    paths = []
    for seed in (0, 7):
        torch.manual_seed(seed)
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                               sliding_window=4, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        directory = tmp_path_factory.mktemp(f"mistral-{seed}")
        MistralForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        paths.append(str(directory))
    return paths


def test_sliding_window_model_matches_trl(windowed_models, parity_rows, tmp_path):
    """With the layouts fit_to_model gives a sliding-window model (the shared prompt goes, except in
    padding-free rows under sdpa), raydpo's first step is TRL's; the shared prompt it turned off, whose one
    dense mask would carry no window, is not."""
    from raydpo.model_loading import fit_to_model

    policy, reference = windowed_models
    torch.manual_seed(0)
    rows = parity_rows[:4]
    theirs = trl_first_step(policy, reference, rows, {"loss_type": "sigmoid"}, str(tmp_path))
    model = load_model(policy, DPOConfig())
    layouts = []
    for asked in ({}, {"padding_free": True}):
        fitted = fit_to_model(DPOConfig(max_length=32, **asked), model)
        layouts.append((fitted.share_prompt, fitted.padding_free))
        ours = raydpo_first_step(policy, reference, rows, {"share_prompt": fitted.share_prompt,
                                                           "padding_free": fitted.padding_free})
        for name in COMPARED:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), (name, asked)
    assert layouts == [(False, False), (True, True)]
    unfitted = raydpo_first_step(policy, reference, rows, {})  # the dense shared-prompt mask: no window
    assert unfitted["logps/rejected"] != pytest.approx(theirs["logps/rejected"], rel=1e-3)


# --- bf16: TRL's single-process autocast (issue 14) ---

# raydpo's bf16 against TRL's on the same step. Under autocast a matmul's bf16 rounding depends on the shapes
# it runs: the shared-prompt and two-sequence layouts give every output element TRL's own dot products, so
# their forward agrees as closely as fp32 does; the padding-free row runs attention over other spans (0.24%
# on rewards/chosen here). The backward sums gradients in another order in every layout (grad_norm 1e-4).
BF16_LAYOUTS = {"shared_prompt": ({}, 1e-5), "two_sequences": ({"share_prompt": False}, 1e-5),
                "padding_free": ({"padding_free": True}, 1e-5)}  # sdpa per segment: each pair's own spans
BF16_FORWARD = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "entropy"]


@pytest.mark.parametrize("layout", sorted(BF16_LAYOUTS))
def test_first_step_matches_trl_in_bf16(tiny_model, reference_model, parity_rows, tmp_path, layout):
    """bf16=True on both sides: TRL's CPU autocast over float32 weights (one process), raydpo's step under
    precision.autocast, in each of raydpo's batch layouts."""
    options, tolerance = BF16_LAYOUTS[layout]
    torch.manual_seed(0)
    rows = parity_rows[:4]
    theirs = trl_first_step(tiny_model, reference_model, rows, {"loss_type": "sigmoid", "bf16": True}, str(tmp_path))
    ours = raydpo_first_step(tiny_model, reference_model, rows, {**options, "bf16": True})
    fp32 = raydpo_first_step(tiny_model, reference_model, rows, {**options, "bf16": False})
    for name in BF16_FORWARD:
        assert ours[name] == pytest.approx(theirs[name], rel=tolerance, abs=1e-7), name
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)
    assert ours["num_tokens"] == theirs["num_tokens"]
    # bf16 really ran: raydpo's own fp32 step is farther from its bf16 one than 100x the shared layouts' tolerance
    assert fp32["rewards/chosen"] != pytest.approx(ours["rewards/chosen"], rel=1e-3)


BF16_STEPS = dict(learning_rate=1e-3, max_steps=3, logging_steps=1, max_length=32, seed=0, bf16=True)


def test_bf16_steps_match_trl(ray_session, tiny_model, reference_model, parity_rows, tmp_path):
    """Three bf16 optimizer steps in local mode (num_workers=0, one Ray Train worker's numbers: test_train_e2e;
    DeepSpeed's torch_autocast around the policy,
    the in-worker reference under the same autocast) against TRL's single-process bf16 on the same global
    batch. Step 1 agrees as the in-process step does (its forward to 1e-5, where TRL's own fp32 run is
    5e-3 away on rewards/chosen). After it, bf16's rounding of the activations amplifies the 1e-4 by which
    the summed gradients differ: measured here, the later steps stay within 1.4e-4 (loss), 3.8e-4
    (grad_norm), 8.5e-4 (logps/chosen) and 2.1e-4 (margins, absolute), about as far as TRL's own bf16
    and fp32 runs drift apart; the tolerances leave room for another CPU's bf16 kernels."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from raydpo import DPOTrainer

    rows = parity_rows[:4]

    def trl(bf16):
        args = TRLConfig(output_dir=str(tmp_path / f"trl-{bf16}"), per_device_train_batch_size=4, report_to="none",
                         save_strategy="no", use_cpu=True, disable_tqdm=True, **{**BF16_STEPS, "bf16": bf16})
        trainer = TRLTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_model), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(tiny_model))
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    theirs, their_fp32 = trl(True), trl(False)
    config = DPOConfig(output_dir=str(tmp_path / "raydpo"), num_workers=0, per_device_train_batch_size=4,
                       save_strategy="no", report_to="none", **BF16_STEPS)
    out = DPOTrainer(tiny_model, ref_model=reference_model, args=config, train_dataset=rows).train()
    ours = [h for h in out.history if "loss" in h]
    print({"trl": theirs, "trl_fp32": their_fp32, "raydpo": ours})

    assert [h["global_step"] for h in ours] == [h["step"] for h in theirs] == [1, 2, 3]
    first, trl_first = ours[0], theirs[0]
    for name in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert first[name] == pytest.approx(trl_first[name], rel=1e-5), name
    assert first["grad_norm"] == pytest.approx(trl_first["grad_norm"], rel=1e-3)
    assert their_fp32[0]["rewards/chosen"] != pytest.approx(trl_first["rewards/chosen"], rel=1e-3)  # bf16 ran
    for step, (mine, trl_step) in enumerate(zip(ours[1:], theirs[1:]), start=2):
        assert mine["learning_rate"] == pytest.approx(trl_step["learning_rate"], rel=1e-6), step
        assert mine["loss"] == pytest.approx(trl_step["loss"], rel=1e-3), step
        assert mine["grad_norm"] == pytest.approx(trl_step["grad_norm"], rel=5e-3), step
        assert mine["logps/chosen"] == pytest.approx(trl_step["logps/chosen"], rel=5e-3), step
        assert mine["rewards/margins"] == pytest.approx(trl_step["rewards/margins"], abs=2e-3), step
    assert theirs[2]["loss"] < theirs[0]["loss"] - 0.05  # the steps trained: a skipped one would show


# --- several optimizer steps through Ray: TrainingArguments semantics (issue 16) ---

MULTI_STEP = dict(learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="cosine_with_min_lr",
                  lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.34, max_grad_norm=0.05,
                  gradient_accumulation_steps=2, max_steps=5, logging_steps=1, max_length=32, seed=0,
                  eval_strategy="steps", eval_steps=0.4, eval_on_start=True, per_device_eval_batch_size=2,
                  loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])  # a DPO + SFT mix (RPO-style)
STEP_METRICS = ["loss", "grad_norm", "learning_rate", "rewards/chosen", "logps/chosen"]
EVAL_METRICS = ["loss", "rewards/chosen", "logps/chosen"]


def trl_steps(model_path, ref_path, rows, eval_rows, output_dir, batch_size) -> tuple:
    """TRL's logged training steps, and its evaluations by step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    args = TRLConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, report_to="none",
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, **MULTI_STEP)
    trainer = TRLTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_path), args=args,
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(eval_rows),
                         processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.train()
    history = trainer.state.log_history
    return [h for h in history if "loss" in h], {h["step"]: h for h in history if "eval_loss" in h}


def test_steps_match_trl_with_trainer_arguments(ray_session, tiny_model, reference_model, parity_rows, tmp_path):
    """Five optimizer steps: AdamW (TRL's default, fused) with weight decay and Trainer's no-decay groups,
    a ratio warmup into cosine_with_min_lr, clipping, accumulation, a sigmoid + sft loss mix; raydpo on 2 workers (ZeRO-2), TRL on
    one process with the same global batch. The data set is one global batch, so every step of both
    trains on all its rows: the shuffle (raydpo's group_by_length, TRL's sampler) cannot change a step.
    Evaluations: eval_on_start, then every ceil(0.4 * 5) = 2 steps and at the end."""
    from raydpo import DPOTrainer

    rows, eval_rows = parity_rows[:8], parity_rows[8:12]  # 2 workers x 2 pairs x 2 micro-batches = TRL's 4 x 2
    theirs, their_evals = trl_steps(tiny_model, reference_model, rows, eval_rows, str(tmp_path / "trl"), batch_size=4)
    config = DPOConfig(output_dir=str(tmp_path / "raydpo"), num_workers=2, per_device_train_batch_size=2,
                       save_strategy="no", report_to="none", **MULTI_STEP)
    out = DPOTrainer(tiny_model, ref_model=reference_model, args=config, train_dataset=rows,
                     eval_dataset=eval_rows).train()
    ours = [h for h in out.history if "loss" in h]
    our_evals = {h["global_step"]: h for h in out.history if "eval_loss" in h}

    assert [h["global_step"] for h in ours] == [h["step"] for h in theirs] == [1, 2, 3, 4, 5]
    for step, (mine, trl) in enumerate(zip(ours, theirs), start=1):
        for name in STEP_METRICS:
            assert mine[name] == pytest.approx(trl[name], rel=1e-4, abs=1e-7), (step, name)
    assert sorted(our_evals) == sorted(their_evals) == [0, 2, 4, 5]
    for step, trl in their_evals.items():
        for name in EVAL_METRICS:
            assert our_evals[step][f"eval_{name}"] == pytest.approx(trl[f"eval_{name}"], rel=1e-4, abs=1e-7), (step, name)
    assert out.checkpoint is None  # save_strategy="no"
    assert all(h["grad_norm"] > MULTI_STEP["max_grad_norm"] for h in theirs)  # clipping was active
    rates = [h["learning_rate"] for h in theirs]  # warmup ceil(0.34 * 5) = 2 steps, then down to 10%
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-3) and rates[2] == pytest.approx(1e-2)


# --- PEFT: continuing a saved adapter (issue 16) ---

PEFT_STEPS = dict(learning_rate=1e-2, max_steps=2, logging_steps=1, max_length=32, seed=0)
PEFT_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "grad_norm"]


def test_continued_adapter_matches_trl(ray_session, tiny_model, parity_rows, tmp_path):
    """A PeftModel holding a saved (non-identity) LoRA adapter, continued with ref_model=None: TRL's reference
    is a frozen copy of that adapter ("ref"), not the base. raydpo (the object shipped as its adapter folder,
    2 workers, ZeRO-3, where the "ref" adapter is sharded with the rest) and TRL (one process, the same global
    batch) log the same two steps: at step 1 the policy is its reference (zero rewards; the base as reference
    would not give that), at step 2 the adapter has moved away from it."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from raydpo import DPOTrainer

    adapter = str(tmp_path / "adapter")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                      init_lora_weights=False, task_type="CAUSAL_LM")  # random B: the adapter is not the base
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)

    def continued():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter, is_trainable=True)

    rows = parity_rows[:8]  # one global batch: 2 workers x 4 pairs = TRL's 8
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, report_to="none",
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, **PEFT_STEPS)
    trl = TRLTrainer(model=continued(), args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=AutoTokenizer.from_pretrained(tiny_model))
    assert "ref" in trl.model.peft_config  # TRL's frozen copy of the loaded adapter
    trl.train()
    theirs = [h for h in trl.state.log_history if "loss" in h]

    config = DPOConfig(output_dir=str(tmp_path / "raydpo"), num_workers=2, zero_stage=3, per_device_train_batch_size=4,
                       report_to="none", **PEFT_STEPS)  # the last step is saved
    out = DPOTrainer(continued(), args=config, train_dataset=rows).train()
    ours = [h for h in out.history if "loss" in h]
    print({"trl": theirs, "raydpo": ours})

    assert [h["global_step"] for h in ours] == [h["step"] for h in theirs] == [1, 2]
    for step, (mine, trl_step) in enumerate(zip(ours, theirs), start=1):
        for name in PEFT_METRICS:
            assert mine[name] == pytest.approx(trl_step[name], rel=1e-4, abs=1e-6), (step, name)
    assert theirs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is its reference
    assert abs(theirs[1]["rewards/margins"]) > 1e-3  # step 2: it has moved from it
    saved = os.path.join(out.checkpoint, "model")  # the trained adapter alone, not its frozen "ref" copy
    assert os.path.isfile(os.path.join(saved, "adapter_config.json")) and not os.path.exists(os.path.join(saved, "ref"))


# --- Mixture-of-Experts: the router's load-balancing loss (issue 16) ---

MOE_STEPS = dict(learning_rate=1e-2, max_steps=2, logging_steps=1, max_length=32, seed=0, router_aux_loss_coef=0.1,
                 eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
MOE_METRICS = ["loss", "aux_loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy"]


@pytest.fixture(scope="module")
def tiny_moe_model(parity_rows, tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2) with the tiny model's tokenizer."""
    from raydpo.models import build_tiny_model

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in parity_rows] + ["0 1 2 3 4 5 6 7 8 9 even odd"]
    return build_tiny_model(tmp_path_factory.mktemp("moe"), texts, experts=4)


def test_router_aux_loss_coef_follows_trl(tiny_model, tiny_moe_model, parity_rows):
    """TRL's rule: the field, else the MoE config's own coefficient; nothing for a model that is not MoE (an
    error when the field is set, raised by DPOTrainer before any worker starts); batches of an MoE run with
    an auxiliary loss use the two-sequence layout."""
    from transformers import AutoConfig

    from raydpo import DPOTrainer
    from raydpo.losses import router_aux_loss_coef
    from raydpo.model_loading import fit_to_model

    moe, dense = AutoConfig.from_pretrained(tiny_moe_model), AutoConfig.from_pretrained(tiny_model)
    assert router_aux_loss_coef(moe, None) == moe.router_aux_loss_coef == 0.001  # Mixtral's default
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(moe, 0.3) == 0.3
    assert router_aux_loss_coef(dense, None) == 0.0 and router_aux_loss_coef(dense, 0.0) == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef is 0.3 but .* not a Mixture-of-Experts"):
        router_aux_loss_coef(dense, 0.3)
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        DPOTrainer(tiny_model, args=DPOConfig(router_aux_loss_coef=0.3), train_dataset=parity_rows[:4])
    with pytest.raises(ValueError, match="must be a number or None"):
        DPOConfig(router_aux_loss_coef="0.1")
    moe_model, dense_model = load_model(tiny_moe_model, DPOConfig()), load_model(tiny_model, DPOConfig())
    fitted = fit_to_model(DPOConfig(), moe_model)
    assert (fitted.router_aux_loss_coef, fitted.share_prompt) == (0.001, False)
    assert fit_to_model(DPOConfig(router_aux_loss_coef=0.0), moe_model).share_prompt  # no aux loss: shared again
    fitted = fit_to_model(DPOConfig(), dense_model)
    assert (fitted.router_aux_loss_coef, fitted.share_prompt) == (0.0, True)


def test_moe_aux_loss_matches_trl(ray_session, tiny_moe_model, parity_rows, tmp_path):
    """An MoE policy with router_aux_loss_coef=0.1: the loss is DPO's plus 0.1 * the router's load-balancing
    loss, logged as aux_loss (and eval_aux_loss), and its gradient trains the router. raydpo (one worker: the
    loss is not linear in the batch, so TRL's single process is matched by one process: local mode,
    num_workers=0; ZeRO-3) and TRL log
    the same two steps and evaluation (1e-4)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    from raydpo import DPOTrainer

    rows, eval_rows = parity_rows[:8], parity_rows[8:12]
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, report_to="none",
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, **MOE_STEPS)
    trl = TRLTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_moe_model), args=args,
                     train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(eval_rows),
                     processing_class=AutoTokenizer.from_pretrained(tiny_moe_model))
    trl.train()
    theirs = [h for h in trl.state.log_history if "loss" in h]
    their_eval = next(h for h in trl.state.log_history if "eval_loss" in h)

    config = DPOConfig(output_dir=str(tmp_path / "raydpo"), num_workers=0, zero_stage=3, per_device_train_batch_size=8,
                       save_strategy="no", report_to="none", **MOE_STEPS)
    out = DPOTrainer(tiny_moe_model, args=config, train_dataset=rows, eval_dataset=eval_rows).train()
    ours = [h for h in out.history if "loss" in h]
    our_eval = next(h for h in out.history if "eval_loss" in h)
    print({"trl": theirs, "trl_eval": their_eval, "raydpo": ours, "raydpo_eval": our_eval})

    assert [h["global_step"] for h in ours] == [h["step"] for h in theirs] == [1, 2]
    for step, (mine, trl_step) in enumerate(zip(ours, theirs), start=1):
        for name in MOE_METRICS:
            assert mine[name] == pytest.approx(trl_step[name], rel=1e-4, abs=1e-6), (step, name)
    for name in ("loss", "aux_loss", "rewards/margins"):
        assert our_eval[f"eval_{name}"] == pytest.approx(their_eval[f"eval_{name}"], rel=1e-4, abs=1e-6), name
    assert theirs[0]["aux_loss"] > 1.0  # about top_k = 2 for an evenly balanced router: a real term in the loss
    assert theirs[0]["loss"] == pytest.approx(math.log(2) + 0.1 * theirs[0]["aux_loss"], rel=1e-6)

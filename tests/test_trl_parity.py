"""TRL 1.16's DPOTrainer and raydpo, same model, reference model and rows: the first logged step's
loss and metrics agree to 1e-4 relative, for every loss type and option, with raydpo's shared-prompt
batches (its default) and once with TRL's two-sequence layout.

TRL runs for real (one optimizer step on one batch, so its shuffle does not matter). raydpo's side is
the worker's own step (`dpo_step`, the metrics window, the pre-clip gradient norm) in-process: the Ray
path around it is checked against this same step elsewhere (test_losses_e2e, test_train_e2e). The
reference is a second model with other weights, so the rewards are not all zero.
"""

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.batching import collate, token_counts
from raydpo.data.tokenize import tokenize_row
from raydpo.losses import LOSSES
from raydpo.reference import InWorkerReference
from raydpo.train.loop import _grad_norm, dpo_step, load_model
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
    options = {k: v for k, v in options.items() if k != "share_prompt"}  # raydpo's alone
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    args = TRLConfig(output_dir=output_dir, per_device_train_batch_size=len(rows), max_steps=1, logging_steps=1,
                     learning_rate=1e-3, max_length=32, report_to="none", save_strategy="no", use_cpu=True,
                     bf16=False, seed=0, disable_tqdm=True, **options)
    trainer = TRLTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_path), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.train()
    return trainer.state.log_history[0]


def raydpo_first_step(model_path, ref_path, rows, options) -> dict:
    from transformers import AutoTokenizer

    config = DPOConfig(max_length=32, per_device_train_batch_size=len(rows), **options)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = collate([tokenize_row(tokenizer, row) for row in rows], tokenizer.pad_token_id, config.max_length,
                    share_prompt=config.share_prompt)
    assert ("gather_index" in batch) == config.share_prompt
    policy = load_model(model_path, config)
    reference = InWorkerReference(load_model(ref_path, config), {})
    loss, per_pair, per_token = dpo_step(policy, reference, batch, config)
    loss.backward()
    window = MetricsWindow()
    window.add(loss, per_pair, per_token, token_counts(batch))
    return {**window.reduce(), "grad_norm": _grad_norm(policy)}


@pytest.mark.parametrize("options", list(cases()), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_first_step_matches_trl(tiny_model, reference_model, parity_rows, tmp_path, options):
    torch.manual_seed(0)
    rows = parity_rows[:4]
    theirs = trl_first_step(tiny_model, reference_model, rows, options, str(tmp_path))
    ours = raydpo_first_step(tiny_model, reference_model, rows, options)
    for name in COMPARED:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    assert theirs["rewards/margins"] != 0.0  # a real comparison: policy and reference differ

"""Every loss type and option trains the parity task on a real (tiny) model without NaN.

Each loss type runs the worker's own `dpo_step` for a few optimizer steps in-process (cheap); one
Ray run then trains an MPO of all fifteen losses with LD-DPO weighting, through the public API,
and logs every TRL metric.
"""

import copy
import math

import pytest
import torch

from raydpo import DPOConfig, DPOTrainer
from raydpo.data.batching import collate
from raydpo.data.tokenize import tokenize_row
from raydpo.losses import LOSSES, SORTING_LOSSES

METRICS = ["loss", "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "logps/chosen",
           "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "learning_rate", "grad_norm", "epoch", "global_step", "num_tokens"]


@pytest.fixture(scope="module")
def parity_batches(tiny_model, parity_rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [tokenize_row(tokenizer, row) for row in parity_rows[:12]]
    return [collate(rows[i:i + 4], tokenizer.pad_token_id) for i in range(0, 12, 4)]


def option_sets(name):
    """The loss alone, then with LD-DPO and (where allowed) WPO weighting."""
    plain = {"label_smoothing": 0.1} if name in ("exo_pair", "robust", "aot", "aot_unpaired") else {}
    return plain, {**plain, "ld_alpha": 0.5, "use_weighting": name not in SORTING_LOSSES}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_type_trains_without_nan(tiny_model, parity_batches, name):
    from transformers import AutoModelForCausalLM

    from raydpo.reference import InWorkerReference
    from raydpo.data.batching import weighted
    from raydpo.train.step import dpo_step

    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = InWorkerReference(copy.deepcopy(policy), ds_config={})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for options in option_sets(name):
        config = DPOConfig(loss_type=name, **options)
        for batch in parity_batches:
            loss, per_pair, per_token = dpo_step(policy, reference, weighted(batch, config.ld_alpha), config)
            assert torch.isfinite(loss), (name, options)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert all(torch.isfinite(p).all() for p in policy.parameters()), (name, options)
            assert all(torch.isfinite(v).all() for v in per_pair.values())
            assert all(torch.isfinite(s / n) for s, n in per_token.values())


def test_mpo_of_every_loss_trains_end_to_end(ray_session, tiny_model, parity_rows, tmp_path):
    """Every loss at once, through DPOTrainer in local mode (num_workers=0: the same numbers as one Ray
    Train worker, test_train_e2e.test_local_mode_is_a_one_worker_run_in_this_process)."""
    names = sorted(LOSSES)
    config = DPOConfig(output_dir=str(tmp_path), num_workers=0, max_steps=2, logging_steps=1, save_steps=100,
                       per_device_train_batch_size=4, learning_rate=1e-3, max_length=32, label_smoothing=0.1,
                       loss_type=names, loss_weights=[1.0 / len(names)] * len(names), ld_alpha=0.5)
    out = DPOTrainer(tiny_model, args=config, train_dataset=parity_rows[:16]).train()
    assert [h["global_step"] for h in out.history] == [1, 2]
    for name in METRICS:
        assert name in out.metrics and math.isfinite(out.metrics[name]), name
    assert 0.0 <= out.metrics["mean_token_accuracy"] <= 1.0 and out.metrics["entropy"] > 0

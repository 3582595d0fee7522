"""Reference modes: in-worker, PEFT (base with adapters disabled, or a continued adapter's frozen copy) and
precomputed by an actor pool."""

import dataclasses
import json
import math

import pytest
import torch

from raydpo import DPOConfig, DPOTrainer
from raydpo.data.batching import collate
from raydpo.logprobs import model_completion_logps
from raydpo.loss_weights import ld_weights
from raydpo.reference import InWorkerReference, PeftBaseReference, PrecomputedReference
from raydpo.reference.precompute import ReferenceLogps
from raydpo.model_loading import load_model, load_policy


def tokenized_rows(model_dir, rows):
    from transformers import AutoTokenizer

    from raydpo.data.tokenize import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenize_row(tokenizer, row) for row in rows], tokenizer.pad_token_id


def lora(**overrides):
    from peft import LoraConfig

    values = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, task_type="CAUSAL_LM")
    values.update(overrides)
    return LoraConfig(**values)


def test_peft_reference_is_the_base_model(tiny_model, parity_rows):
    rows, pad = tokenized_rows(tiny_model, parity_rows[:6])
    config = DPOConfig(max_length=32)
    batch = collate(rows, pad, 32)
    policy = load_policy(tiny_model, config, lora(init_lora_weights=False))  # random B: adapters change outputs
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    base = InWorkerReference(load_model(tiny_model, config), {}).logps(batch)
    with torch.no_grad():
        adapted = model_completion_logps(policy, batch)
    assert not torch.allclose(adapted, base)
    reference = PeftBaseReference(policy).logps(batch)
    assert torch.equal(reference, base)
    assert not reference.requires_grad
    with torch.no_grad():  # adapters are enabled again afterwards
        assert torch.equal(model_completion_logps(policy, batch), adapted)


def test_a_continued_adapter_is_its_own_frozen_reference(tiny_model, parity_rows, tmp_path):
    """An adapter folder continued with ref_model=None: the reference is that adapter, loaded a second time
    as the frozen "ref" adapter (TRL's), not the base. It never reaches the optimizer, the reference
    forward leaves the trained adapter active and trainable, only the trained adapter is saved, and the
    actors' reference (load_model of the folder) gives the same log-probs."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raydpo.model_loading import REF_ADAPTER
    from raydpo.train.deepspeed import param_groups
    from raydpo.model_loading import continued_adapter

    adapter = str(tmp_path / "adapter")
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora(init_lora_weights=False))
    trained.save_pretrained(adapter)
    assert continued_adapter(adapter, None) == adapter and continued_adapter(adapter, tiny_model) is None
    assert continued_adapter(tiny_model, None) is None
    rows, pad = tokenized_rows(tiny_model, parity_rows[:6])
    batch = collate(rows, pad, 32)
    config = DPOConfig(max_length=32)
    policy = load_policy(adapter, config, reference_adapter=adapter)
    assert set(policy.peft_config) == {"default", REF_ADAPTER} and policy.active_adapter == "default"
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)
    optimized = {id(p) for group in param_groups(policy, 0.0) for p in group["params"]}
    assert not any(id(p) in optimized for name, p in policy.named_parameters() if f".{REF_ADAPTER}." in name)
    with torch.no_grad():
        policy_logps = model_completion_logps(policy, batch)
    base = InWorkerReference(load_model(tiny_model, config), {}).logps(batch)
    assert not torch.allclose(policy_logps, base)  # the adapter changes outputs: base and adapter differ

    reference = PeftBaseReference(policy, REF_ADAPTER).logps(batch)
    assert torch.equal(reference, policy_logps)  # before training, the policy is its reference
    assert policy.active_adapter == "default"
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():  # the reference stays put while the trained adapter moves
        for name, p in policy.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.5)
        moved = model_completion_logps(policy, batch)
    assert not torch.allclose(moved, policy_logps)
    assert torch.equal(PeftBaseReference(policy, REF_ADAPTER).logps(batch), reference)
    assert torch.allclose(InWorkerReference(load_model(adapter, config), {}).logps(batch), reference, atol=1e-6, rtol=0)

    saved = tmp_path / "checkpoint" / "model"
    policy.save_pretrained(str(saved), selected_adapters=[policy.active_adapter])  # as checkpoint.export_model
    assert (saved / "adapter_config.json").is_file() and not (saved / REF_ADAPTER).exists()
    with pytest.raises(ValueError, match="no adapter 'other'"):
        PeftBaseReference(policy, "other")

    # DPOTrainer.evaluate() (driver_eval): the initial adapter is its own reference; a checkpoint's moved
    # adapter is scored against the adapter it started from
    import types

    from transformers import AutoTokenizer

    from raydpo.train.driver_eval import evaluate_policy

    import pyarrow as pa

    # what it reads of a TokenizedData: the dataset's Arrow blocks (Shard.read)
    data = types.SimpleNamespace(dataset=types.SimpleNamespace(
        iter_batches=lambda **options: iter([pa.Table.from_pylist(rows)])))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    initial = evaluate_policy(config, adapter, None, None, tokenizer, data)
    assert initial["eval_rewards/margins"] == 0.0 and initial["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    trained = evaluate_policy(config, adapter, None, None, tokenizer, data, checkpoint_dir=str(tmp_path / "checkpoint"))
    assert abs(trained["eval_rewards/margins"]) > 1e-3


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_actor_logps_equal_the_in_worker_reference(tiny_model, parity_rows, ld_alpha):
    rows, pad = tokenized_rows(tiny_model, parity_rows[:10])
    config = DPOConfig(max_length=12, ld_alpha=ld_alpha)  # truncates some sequences
    import pyarrow as pa

    scorer = ReferenceLogps(tiny_model, config.to_dict(), pad)
    # one precompute batch of 10 against two micro-batches of 4 and 6, padded to other lengths
    table = scorer(pa.Table.from_pylist(rows))
    scored = table.to_pylist()
    reference = InWorkerReference(load_model(tiny_model, config), {})
    for part in (slice(0, 4), slice(4, 10)):
        batch = collate(scored[part], pad, 12)
        if ld_alpha is not None:
            batch.logp_weights = ld_weights(batch.completion_mask, ld_alpha)
        expected = reference.logps(batch)
        got = PrecomputedReference().logps(batch)
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # rows that already carry both columns keep them; a missing value is computed
    given = [dict(r, ref_chosen_logps=-1.5, ref_rejected_logps=-2.5) for r in rows[:3]]
    mixed = scorer(pa.Table.from_pylist(given + [dict(r, ref_chosen_logps=None, ref_rejected_logps=None)
                                                 for r in rows[3:5]])).to_pylist()
    assert [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in mixed[:3]] == [(-1.5, -2.5)] * 3
    assert mixed[3]["ref_chosen_logps"] == pytest.approx(scored[3]["ref_chosen_logps"], abs=1e-5)


def e2e_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), num_workers=2, max_steps=2, logging_steps=1, save_steps=100,
                  per_device_train_batch_size=4, learning_rate=1e-2, max_length=32)
    values.update(overrides)
    return DPOConfig(**values)


# continuing an adapter: test_trl_parity.test_continued_adapter_matches_trl
@pytest.mark.parametrize("stage, workers", [(2, 0), (3, 2)])  # ZeRO-2 in local mode, ZeRO-3 sharded over 2 workers
def test_peft_trains_an_adapter_and_leaves_the_base(ray_session, tiny_model, parity_rows, tmp_path, stage, workers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}
    trainer = DPOTrainer(tiny_model, args=e2e_config(tmp_path / "new", zero_stage=stage, num_workers=workers),
                         train_dataset=parity_rows[:40], peft_config=lora())
    out = trainer.train()
    assert out.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at 0: policy == base
    assert out.history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())  # the base folder is untouched
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter trained
    for name, value in model.get_base_model().state_dict().items():  # base weights bit-identical
        if "lora_" not in name:
            assert torch.equal(value, original[name.replace(".base_layer", "")]), name



# In-worker, precomputed and streamed references agree on 2 workers: test_many_runs.test_reference_modes_agree


def test_streamed_reference_prefetches_ahead(ray_session, tiny_model, parity_rows):
    """rows_ahead keeps batches in flight on the pool, fills each row once and never re-sends it: the
    shard keeps the values, although each batch's row dicts are built afresh."""

    from raydpo.data.shard import Shard
    from raydpo.reference.streamed import StreamedReference, start_reference_pool, stop_reference_pool

    rows, pad = tokenized_rows(tiny_model, parity_rows[:8])
    config = DPOConfig(max_length=32, precompute_ref_resources={"CPU": 0.5})
    scorer = ReferenceLogps(tiny_model, config.to_dict(), pad)
    expected = [value for pair in zip(*scorer.score(rows)) for value in pair]

    actors = start_reference_pool(tiny_model, config, pad)
    try:
        sent = []

        class Counting(StreamedReference):
            def _submit(self, batch_rows):
                sent.append(sum(1 for row in batch_rows if "ref_chosen_logps" not in row))
                return super()._submit(batch_rows)

        reference = Counting(actors, prefetch_batches=2)
        shard = Shard.from_rows(rows)
        stream = reference.rows_ahead(shard, [[0, 1], [2, 3], [4, 5], [6, 7]])
        first = next(stream)
        assert len(sent) == 3  # the first batch and the two behind it were sent before it came back
        streamed = first + [row for batch in stream for row in batch]
        assert [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in streamed] == rows
        assert sent == [2, 2, 2, 2]
        got = [r[column] for r in streamed for column in ("ref_chosen_logps", "ref_rejected_logps")]
        assert got == pytest.approx(expected, abs=1e-5)  # scored in batches of 2 instead of 8: other padding
        reference.before_eval(shard, 3)  # the shard kept every row's values: nothing is scored again
        again = [row for batch in reference.rows_ahead(shard, [[0, 1, 2]]) for row in batch]
        assert [r["ref_chosen_logps"] for r in again] == [r["ref_chosen_logps"] for r in streamed[:3]]
        assert sum(sent) == 8
    finally:
        stop_reference_pool(actors)


def test_rows_carrying_reference_columns_keep_them(ray_session, tiny_model, parity_rows):
    from transformers import AutoTokenizer

    from raydpo.data.tokenize import prepare_dataset
    from raydpo.reference.precompute import needs_precompute, precompute_ref_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = DPOConfig(max_length=32, precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    given = [dict(r, ref_chosen_logps=-1.0 - i, ref_rejected_logps=-2.0) for i, r in enumerate(parity_rows[:4])]
    data = prepare_dataset(given + parity_rows[4:8], tokenizer, config)
    out = precompute_ref_logps(data.dataset, tiny_model, config, tokenizer.pad_token_id).take_all()
    assert [r["ref_chosen_logps"] for r in out[:4]] == [-1.0, -2.0, -3.0, -4.0]
    assert all(r["ref_rejected_logps"] == -2.0 for r in out[:4])
    assert all(r["ref_chosen_logps"] is not None and r["ref_chosen_logps"] < 0 for r in out[4:])
    assert [r["prompt_ids"] for r in out] == [r["prompt_ids"] for r in data.dataset.take_all()]  # order kept
    complete = prepare_dataset(given, tokenizer, config)
    assert not needs_precompute(complete.dataset)  # every row has them: no actor starts

    bad = [dict(parity_rows[0], ref_chosen_logps="x", ref_rejected_logps=-1.0)]
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        prepare_dataset(bad, tokenizer, DPOConfig(max_length=32))


def test_reference_cache_is_hit_and_invalidated(ray_session, tiny_model, parity_rows, tmp_path):
    """A second precompute for the same reference, rows and settings runs no reference forward; a
    changed reference model or tokenization setting computes again; clear() empties the cache."""
    import shutil

    from transformers import AutoTokenizer

    from raydpo.data.tokenize import prepare_dataset
    from raydpo.reference import cache as ref_cache
    from raydpo.reference.precompute import precompute_ref_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cache_dir = str(tmp_path / "cache")

    def run(model, **overrides):
        config = DPOConfig(**{"max_length": 32, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 4,
                              "precompute_ref_cache_dir": cache_dir, **overrides})
        data = prepare_dataset(parity_rows[:12], tokenizer, config)
        out = precompute_ref_logps(data.dataset, model, config, tokenizer.pad_token_id)
        forwards = "ReferenceLogps" in out.stats()  # the actor-pool stage ran
        return [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in out.take_all()], forwards

    first, forwards = run(tiny_model)
    assert forwards and len(first) == 12
    again, forwards = run(tiny_model)
    assert not forwards and again == first
    _, forwards = run(tiny_model, max_length=16)  # other truncation: other log-probs
    assert forwards
    other_model = shutil.copytree(tiny_model, tmp_path / "other_model")
    _, forwards = run(str(other_model))
    assert forwards
    _, forwards = run(tiny_model, precompute_ref_cache_dir=None)  # cache off
    assert forwards
    assert ref_cache.clear(cache_dir) == 3
    _, forwards = run(tiny_model)
    assert forwards


def test_tr_dpo_sync_mixes_the_weights(tiny_model):
    from transformers import AutoModelForCausalLM

    config = DPOConfig()
    reference = InWorkerReference(load_model(tiny_model, config), {})
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    reference.sync_from(policy, alpha=0.25)
    for name, value in reference.model.state_dict().items():
        expected = 0.25 * policy.state_dict()[name] + 0.75 * before[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_tr_dpo_is_refused_with_peft(ray_session, tiny_model, parity_rows):
    with pytest.raises(ValueError, match="sync_ref_model.*PEFT"):
        DPOTrainer(tiny_model, args=DPOConfig(sync_ref_model=True, max_length=32), train_dataset=parity_rows[:4],
                   peft_config=lora())


def test_tr_dpo_reference_at_a_sync_step(ray_session, tiny_model, parity_rows, tmp_path):
    """ZeRO-3 on 2 workers, where the reference is mixed shard by shard: at sync step 2 the saved
    reference is alpha * policy(step 2) + (1 - alpha) * initial reference."""
    from transformers import AutoModelForCausalLM

    args = DPOConfig(output_dir=str(tmp_path), run_name="run", num_workers=2, zero_stage=3, max_steps=3,
                     per_device_train_batch_size=4, learning_rate=1e-2, max_length=32, logging_steps=1,
                     save_steps=1, sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=2)
    full = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:24]).train()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    policy_2 = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-2" / "model").state_dict()
    for step, expected_mixed in ((1, False), (2, True), (3, True)):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f"checkpoint-{step}" / "reference").state_dict()
        for name, value in saved.items():
            expected = 0.3 * policy_2[name] + 0.7 * initial[name] if expected_mixed else initial[name]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-5, msg=f"step {step}: {name}")
    assert any(not torch.equal(policy_2[n], initial[n]) for n in initial)  # the policy did move

    # A resumed run continues from the saved (moved) reference, not the initial one.
    resumed = DPOTrainer(tiny_model, args=dataclasses.replace(args, output_dir=str(tmp_path / "resumed")),
                         train_dataset=parity_rows[:24],
                         resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")).train()
    assert resumed.metrics["global_step"] == 3
    assert resumed.metrics["loss"] == pytest.approx(full.metrics["loss"], abs=1e-5)
    assert resumed.metrics["rewards/margins"] == pytest.approx(full.metrics["rewards/margins"], abs=1e-5)

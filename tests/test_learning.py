"""DPO must learn: a tiny random model, a rule it can pick up (parity of the last digit), and
held-out pairs it never trained on. Chance is 0.5."""

import pytest

from raydpo import DPOConfig, DPOTrainer


def test_held_out_reward_accuracy_rises(ray_session, tiny_model, parity_rows, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.evaluate import preference_scores

    train_rows, held_out = parity_rows[:200], parity_rows[200:]
    # local mode (num_workers=0: this process, one Ray Train worker's numbers), 16 pairs a step as 2 x 8 would be
    args = DPOConfig(output_dir=str(tmp_path), num_workers=0, per_device_train_batch_size=16, learning_rate=3e-3,
                     beta=0.1, num_train_epochs=8, logging_steps=10, save_steps=1000, max_length=32,
                     lr_scheduler_type="constant")
    trainer = DPOTrainer(tiny_model, args=args, train_dataset=train_rows, eval_dataset=held_out)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    before = AutoModelForCausalLM.from_pretrained(tiny_model)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    scores = preference_scores(after, tokenizer, held_out, beta=0.1, max_length=32, ref_model=before)
    assert scores["reward_accuracy"] >= 0.9, scores
    assert trainer.state.history[-1]["rewards/accuracies"] > 0.9
    # the final evaluation (always run with an eval set) saw the same held-out pairs
    assert trainer.state.metrics["eval_rewards/accuracies"] == pytest.approx(scores["reward_accuracy"], abs=0.05)

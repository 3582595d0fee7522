"""DPOTrainer's Trainer surface: model objects as model / ref_model, and transformers TrainerCallbacks
on the driver (events live while Ray Train runs; control.should_training_stop honoured)."""

import math

import pytest
import torch

from raydpo import DPOConfig, DPOTrainer
from raydpo.train.callbacks import CallbackHandler
from raydpo.train.model_objects import save_model_object
from raydpo.train.spec import TrainingPlan


class Recorder:
    """A TrainerCallback (duck-typed as transformers accepts it) that records each call; it stops the
    run in on_log at `stop_at`."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.calls.append(("on_train_begin", state.global_step, state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append(("on_log", state.global_step, dict(logs)))
        if self.stop_at is not None and state.global_step >= self.stop_at and "loss" in logs:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.calls.append(("on_evaluate", state.global_step, dict(metrics)))

    def on_save(self, args, state, control, **kwargs):
        self.calls.append(("on_save", state.global_step, state.best_model_checkpoint))

    def on_train_end(self, args, state, control, **kwargs):
        self.calls.append(("on_train_end", state.global_step, len(state.log_history)))

    def events(self):
        return [(name, step) for name, step, _ in self.calls]


def test_callback_handler_follows_transformers_order():
    """Without Ray: a row with training and eval metrics is two log_history entries, on_log twice, then
    on_evaluate; a save of the best step sets best_model_checkpoint; a returned TrainerControl replaces it."""
    from transformers import TrainerCallback, TrainerControl

    class Replacing(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            return TrainerControl(should_training_stop=True)

    recorder = Recorder()
    handler = CallbackHandler([recorder, Replacing], DPOConfig(eval_strategy="steps", logging_steps=0.5), None)
    handler.train_begin(TrainingPlan(micro_batches_per_epoch=2, steps_per_epoch=2, total_steps=4, eval_batches=2),
                        "/runs/run")
    handler.handle(("log", {"loss": 0.7, "global_step": 2, "epoch": 1.0, "eval_loss": 0.6}))
    handler.handle(("save", 2))
    handler.handle(("log", {"loss": 0.5, "global_step": 4, "epoch": 2.0, "eval_loss": 0.65}))
    handler.handle(("save", 4))
    handler.train_end()

    assert recorder.events() == [("on_train_begin", 0), ("on_log", 2), ("on_log", 2), ("on_evaluate", 2),
                                 ("on_save", 2), ("on_log", 4), ("on_log", 4), ("on_evaluate", 4), ("on_save", 4),
                                 ("on_train_end", 4)]
    assert recorder.calls[0][2] == 4 and handler.state.logging_steps == 2  # max_steps; the ratio resolved
    assert recorder.calls[1][2] == {"loss": 0.7, "epoch": 1.0} and recorder.calls[2][2] == {"eval_loss": 0.6, "epoch": 1.0}
    assert handler.state.log_history[:2] == [{"loss": 0.7, "epoch": 1.0, "step": 2}, {"eval_loss": 0.6, "epoch": 1.0, "step": 2}]
    assert (handler.state.best_metric, handler.state.best_global_step) == (0.6, 2)
    assert recorder.calls[4][2] == handler.state.best_model_checkpoint == "/runs/run/checkpoint-2"
    assert handler.control.should_training_stop


def test_bad_model_and_callback_types_are_refused():
    with pytest.raises(TypeError, match="PreTrainedModel or a peft.PeftModel; got int"):
        DPOTrainer(3, train_dataset=[])
    with pytest.raises(TypeError, match="none of the methods"):
        CallbackHandler([object()], DPOConfig())


def test_a_peft_model_ships_as_its_adapter_folder(tiny_model, parity_rows, tmp_path):
    """A PeftModel is saved as the adapter folder its save_pretrained writes: the base is the one it was
    loaded on, and load_policy continues the same adapter (same log-probs). A PEFT reference is refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.data.batching import collate
    from raydpo.data.tokenize import tokenize_row
    from raydpo.logprobs import model_completion_logps
    from raydpo.model_loading import adapter_base, is_adapter_dir
    from raydpo.model_loading import load_policy

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = save_model_object(model, str(tmp_path / "model"), "model")
    assert is_adapter_dir(folder) and adapter_base(folder) == tiny_model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = collate([tokenize_row(tokenizer, row) for row in parity_rows[:4]], tokenizer.pad_token_id, 32)
    policy = load_policy(folder, DPOConfig())
    with torch.no_grad():
        assert torch.allclose(model_completion_logps(policy, batch), model_completion_logps(model.eval(), batch),
                              atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="ref_model is a peft.PeftModel"):
        save_model_object(model, str(tmp_path / "ref"), "ref_model")


def test_model_objects_train_as_their_paths_and_callbacks_stop(ray_session, tiny_model, parity_rows, tmp_path):
    """model and ref_model as objects give the saved paths' losses (1e-6); a TrainerCallback gets its
    events while the run goes on, and its should_training_stop ends the run after step 2 of 3."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():  # a reference unlike the policy, so the first step's loss is not log 2
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    reference.save_pretrained(tmp_path / "reference")

    def config(name, workers):
        return DPOConfig(output_dir=str(tmp_path / name), run_name="run", num_workers=workers, max_steps=3,
                         logging_steps=1, save_steps=100, per_device_train_batch_size=4, learning_rate=1e-3,
                         max_length=32)

    rows = parity_rows[:40]
    # the paths' numbers in local mode (a 1-worker run's, exactly: test_train_e2e.test_local_mode_...); the
    # objects' run and its callback through one Ray Train worker, whose events reach this process
    by_path = DPOTrainer(tiny_model, ref_model=str(tmp_path / "reference"), args=config("path", 0),
                         train_dataset=rows).train()
    recorder = Recorder(stop_at=2)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model), ref_model=reference, args=config("object", 1),
                         train_dataset=rows, callbacks=[recorder])
    assert trainer.model.startswith(str(tmp_path / "object" / "raydpo-model-objects"))  # saved once, a path now
    by_object = trainer.train()

    assert by_path.history[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    for ours, theirs in zip(by_object.history, by_path.history[:2]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        assert ours["rewards/margins"] == pytest.approx(theirs["rewards/margins"], abs=1e-6)
    # stopped by the callback at step 2, which was saved for save_model
    assert [h["global_step"] for h in by_object.history] == [1, 2]
    assert by_object.checkpoint.endswith("checkpoint-2")
    assert recorder.events() == [("on_train_begin", 0), ("on_log", 1), ("on_log", 2), ("on_save", 2),
                                 ("on_train_end", 2)]
    assert recorder.calls[1][2]["loss"] == by_object.history[0]["loss"]

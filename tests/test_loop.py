"""The training loop's control flow without Ray or DeepSpeed, in milliseconds (as NeMo-RL tests its DPO
driver with a mock policy): a fake engine (a tiny torch model and SGD, stepping at accumulation
boundaries as DeepSpeed does) and a fake run context (the Ray Train report/checkpoint calls, the metrics
history and the driver's callbacks) record what happens, in order. The batch, loss, metrics, schedule
and checkpoint-writing code are the real ones. The full Ray runs stay in test_train_e2e.py,
test_reliability.py and test_evaluation.py."""

import tempfile
from types import SimpleNamespace

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.batching import epoch_order
from raydpo.data.shard import Shard
from raydpo.reference.base import Reference
from raydpo.train.loop import DPOWorker
from raydpo.train.schedule import resolve_ratios
from raydpo.train.spec import ResumeState, WorkerSpec, training_plan

VOCAB = 16


class TinyLM(torch.nn.Module):
    """Logits from token embeddings: enough for real log-probs, a real loss and real gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))

    def save_pretrained(self, directory, state_dict=None):  # checkpoint.export_model's call
        pass


class FakeEngine:
    """What the loop uses of a DeepSpeed engine. Like DeepSpeed, step() is called after every micro-batch
    and steps the optimizer only at an accumulation boundary."""

    def __init__(self, events: list, accumulation: int, lr: float = 0.1):
        self.module, self.device, self.events = TinyLM(), torch.device("cpu"), events
        self.accumulation, self.lr, self.micro_batches = accumulation, lr, 0
        self.saved_states = []

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        self.events.append("micro_batch")
        (loss / self.accumulation).backward()

    def step(self):
        self.micro_batches += 1
        if self.micro_batches % self.accumulation == 0:  # plain SGD (torch.optim's first use imports seconds)
            with torch.no_grad():
                for param in self.module.parameters():
                    param -= self.lr * param.grad
                    param.grad = None
            self.events.append("optimizer_step")

    def get_lr(self):
        return [self.lr]

    def get_global_grad_norm(self):
        raise AssertionError("without ZeRO the loop measures the norm itself, before the step")

    def train(self):
        pass

    def eval(self):
        self.events.append("evaluate")

    def save_checkpoint(self, directory, tag, client_state):
        self.saved_states.append(client_state)


class FakeReference(Reference):
    """Reference log-probs of 0, and a record of each micro-batch's rows (by their "index")."""

    def __init__(self):
        self.batches = []

    def logps(self, batch):
        return torch.zeros(batch.completion_mask.shape[0])

    def rows_ahead(self, rows, index_batches):
        for batch_rows in super().rows_ahead(rows, index_batches):
            self.batches.append([row["index"] for row in batch_rows])
            yield batch_rows


class FakeContext:
    """Ray Train's report and checkpoint, the history actor and the driver's callbacks, recorded."""

    rank, world_size = 0, 1

    def __init__(self, events: list, driver_stops_at=None):
        self.events, self.driver_stops_at, self.logged, self.startup = events, driver_stops_at, [], []

    def startup_mark(self, phase):
        self.startup.append(phase)

    def log(self, metrics):
        self.logged.append(dict(metrics))
        self.events.append(("log", metrics["global_step"], any(name.startswith("eval_") for name in metrics)))

    def report(self, metrics):
        self.events.append(("report", metrics["global_step"]))

    def save(self, step, metrics, write):
        with tempfile.TemporaryDirectory() as directory:
            write(directory)
        self.events.append(("save", step))

    def driver_stops(self, step):
        if self.driver_stops_at is None:  # no TrainerCallbacks: Ray's context answers at once, asking no one
            return False
        self.events.append(("driver", step))
        return step == self.driver_stops_at


def rows(count: int, start: int = 0) -> list:
    return [{"index": i, "prompt_ids": [1, 2 + i % 5], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12 + i % 3]}
            for i in range(start, start + count)]


def worker(num_rows=8, num_eval_rows=0, resume=None, driver_stops_at=None, **options):
    options = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "logging_steps": 1,
               "save_strategy": "no", "report_to": "none", "share_prompt": False, **options}
    config = DPOConfig(**options)
    plan = training_plan(num_rows, config, num_eval_rows)
    config = resolve_ratios(config, plan.total_steps)
    spec = WorkerSpec(config=config.to_dict(), plan=plan, model="unused", ref_model=None, tokenizer=None,
                      pad_token_id=0)
    events = []
    return DPOWorker(spec, config, FakeContext(events, driver_stops_at),
                     FakeEngine(events, config.gradient_accumulation_steps), FakeReference(),
                     {"zero_optimization": {"stage": 0}}, Shard.from_rows(rows(num_rows)),
                     Shard.from_rows(rows(num_eval_rows, start=100)),
                     resume or ResumeState())


def outline(events: list) -> list:
    """The events after each optimizer step, the micro-batches left out."""
    return [event for event in events if event != "micro_batch"]


def test_log_evaluate_save_in_order():
    """Each step logs (an evaluation's metrics in the same row), then saves (the report carries the
    checkpoint) or reports: the evaluation comes before the log, the log before the save."""
    run = worker(num_eval_rows=4, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2)
    run.train()
    assert outline(run.context.events) == [
        "optimizer_step", ("log", 1, False), ("report", 1),
        "optimizer_step", "evaluate", ("log", 2, True), ("save", 2),
        "optimizer_step", ("log", 3, False), ("report", 3),
        "optimizer_step", "evaluate", ("log", 4, True), ("save", 4)]
    # the checkpoint holds where the loop was (checkpoint.save's client_state, read back by a resume)
    assert [state["global_step"] for state in run.engine.saved_states] == [2, 4]
    assert run.engine.saved_states[-1]["num_tokens"] == run.context.logged[-1]["num_tokens"] > 0
    assert run.engine.saved_states[-1]["early_stopping"]["best_metric"] is not None
    assert run.context.startup == ["first_step"] * 4  # each step says so; the context sends the first only


def test_eval_on_start_comes_before_the_first_micro_batch():
    run = worker(num_eval_rows=4, max_steps=1, eval_strategy="steps", eval_steps=5, eval_on_start=True)
    run.train()
    assert run.context.events[:4] == ["evaluate", ("log", 0, True), ("report", 0), "micro_batch"]


def test_early_stopping_ends_the_run_and_saves_that_step():
    """patience 1 and a threshold no evaluation beats: the second evaluation stops the run, and that
    step, the last one, is saved although save_steps is not due."""
    run = worker(num_eval_rows=4, max_steps=8, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                 save_steps=5, early_stopping_patience=1, early_stopping_threshold=1e9)
    run.train()
    assert run.step == 2
    assert outline(run.context.events)[-4:] == ["optimizer_step", "evaluate", ("log", 2, True), ("save", 2)]
    assert run.engine.saved_states[-1]["early_stopping"]["evals_without_improvement"] == 1


def test_driver_callback_stop_saves_and_ends():
    """A TrainerCallback's should_training_stop (asked after each logged step) ends the run there, with a
    checkpoint of that step."""
    run = worker(max_steps=6, save_strategy="steps", save_steps=10, driver_stops_at=2)
    run.train()
    assert outline(run.context.events) == ["optimizer_step", ("log", 1, False), ("report", 1), ("driver", 1),
                                           "optimizer_step", ("log", 2, False), ("report", 2), ("driver", 2),
                                           ("save", 2)]


def test_resume_runs_exactly_the_remaining_micro_batches():
    """A run resumed after step 3 trains on exactly the micro-batches the uninterrupted run trained on
    after step 3 (mid-epoch: 2 optimizer steps per epoch), and its token count goes on from the saved one."""
    options = dict(num_train_epochs=3, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    full = worker(num_rows=4, **options)
    full.train()
    # the oracle: each epoch's seeded, length-grouped order, straight from batching.epoch_order
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows(4)]
    assert full.reference.batches == [batch for epoch in range(3)
                                      for batch in epoch_order(4, 4, 1, full.config.seed, epoch, lengths)]
    tokens_at_3 = full.context.logged[2]["num_tokens"]
    resumed = worker(num_rows=4, resume=ResumeState(global_step=3, num_tokens=tokens_at_3), **options)
    resumed.train()
    assert resumed.reference.batches == full.reference.batches[3 * 2:]
    assert [row["global_step"] for row in resumed.context.logged] == [4, 5, 6]
    assert resumed.context.logged[-1]["num_tokens"] == full.context.logged[-1]["num_tokens"]
    assert [row["epoch"] for row in resumed.context.logged] == [2.0, 2.5, 3.0]


def test_resumed_at_the_last_step_does_nothing():
    run = worker(max_steps=3, resume=ResumeState(global_step=3))
    run.train()
    assert run.context.events == [] and run.reference.batches == []


@pytest.mark.parametrize("options, steps", [
    (dict(num_train_epochs=1.5), 3),  # 2 steps per epoch: half an epoch is one more step
    (dict(num_train_epochs=1, max_steps=5), 5),  # max_steps wins, running into the next epochs
])
def test_max_steps_over_epochs(options, steps):
    run = worker(num_rows=4, **options)
    run.train()
    assert run.context.events.count("optimizer_step") == steps
    assert [row["global_step"] for row in run.context.logged] == list(range(1, steps + 1))
    assert run.context.logged[-1]["epoch"] == steps / 2
    assert len(run.reference.batches) == steps  # one micro-batch per step


def test_accumulation_boundaries():
    """Three micro-batches per optimizer step: the step, the log and the report come after every third."""
    run = worker(num_rows=6, max_steps=2, gradient_accumulation_steps=3, per_device_train_batch_size=1)
    run.train()
    step = ["micro_batch"] * 3 + ["optimizer_step"]
    assert run.context.events == step + [("log", 1, False), ("report", 1)] + step + [("log", 2, False), ("report", 2)]
    # the norm is measured at the boundary, before the step clears the gradients
    assert all(row["grad_norm"] > 0 for row in run.context.logged)
    assert [row["learning_rate"] for row in run.context.logged] == [0.1, 0.1]

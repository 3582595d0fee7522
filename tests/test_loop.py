"""The training loop's control flow without Ray or DeepSpeed, in milliseconds (as NeMo-RL tests its DPO
driver with a mock policy): a fake engine (a tiny torch model and SGD, stepping at accumulation
boundaries as DeepSpeed does) and a fake run context (the Ray Train report/checkpoint calls, the metrics
history and the driver's callbacks) record what happens, in order. The batch, loss, metrics, schedule
and checkpoint-writing code are the real ones. The full Ray runs stay in test_train_e2e.py,
test_reliability.py and test_evaluation.py."""

import math
import tempfile
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

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
        # the shape raydpo/flops.py counts (mfu): 1 layer of width 8, MLP 16, 2 heads of 4
        self.config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)

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
        self.skipped_steps = 0  # DeepSpeed's count of updates its fp16 loss scaler skipped
        self.boundary = None  # set_gradient_accumulation_boundary's override, as DeepSpeed keeps it

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        self.events.append("micro_batch")
        (loss / self.accumulation).backward()

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.boundary = is_boundary

    def step(self):
        self.micro_batches += 1
        boundary = self.micro_batches % self.accumulation == 0 if self.boundary is None else self.boundary
        if boundary:  # plain SGD (torch.optim's first use imports seconds)
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


class LlamaEngine(FakeEngine):
    """The fake engine around a real (tiny, random) Llama: the padding-free layout runs its decoder and
    head apart, with position ids, which TinyLM has not."""

    def __init__(self, events: list, accumulation: int):
        from transformers import LlamaForCausalLM

        super().__init__(events, accumulation)
        torch.manual_seed(0)
        self.module = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=2, attn_implementation="sdpa"))


class OverflowingEngine(FakeEngine):
    """Gradients that overflow at the optimizer steps in `overflow_at`, under ZeRO (the engine keeps the
    norm). With a loss scaler (fp16) the update is skipped and counted, as DeepSpeed's scaler does; without
    one (fp32) the inf norm is all there is."""

    def __init__(self, events: list, accumulation: int, overflow_at: set, scaler: bool):
        super().__init__(events, accumulation)
        self.overflow_at, self.scaler, self.norm = overflow_at, scaler, None

    def step(self):
        if (self.micro_batches + 1) % self.accumulation:  # not a boundary
            return super().step()
        if (self.micro_batches + 1) // self.accumulation not in self.overflow_at:
            self.norm = float(torch.cat([p.grad.flatten() for p in self.module.parameters()]).norm())
            return super().step()
        self.micro_batches += 1
        self.norm = float("inf")
        self.module.zero_grad(set_to_none=True)
        if self.scaler:
            self.skipped_steps += 1
            self.events.append("skipped_step")

    def get_global_grad_norm(self):
        return self.norm


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


def worker(num_rows=8, num_eval_rows=0, resume=None, driver_stops_at=None, engine=FakeEngine, **options):
    options = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "logging_steps": 1,
               "save_strategy": "no", "report_to": "none", "share_prompt": False, **options}
    config = DPOConfig(**options)
    plan = training_plan(num_rows, config, num_eval_rows)
    config = resolve_ratios(config, plan.total_steps)
    spec = WorkerSpec(config=config.to_dict(), plan=plan, model="unused", ref_model=None, tokenizer=None,
                      pad_token_id=0)
    events = []
    return DPOWorker(spec, config, FakeContext(events, driver_stops_at),
                     engine(events, config.gradient_accumulation_steps), FakeReference(),
                     {"zero_optimization": {"stage": config.zero_stage or 0}}, Shard.from_rows(rows(num_rows)),
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
    # throughput: each window's tokens over its wall time (one worker here)
    for before, row in zip([0.0] + [r["num_tokens"] for r in run.context.logged], run.context.logged):
        tokens = row["num_tokens"] - before
        assert tokens > 0 and row["tokens_per_second_per_worker"] == pytest.approx(tokens / row["step_time"], rel=1e-6)


@pytest.mark.parametrize("share_prompt, loss_type", [(False, "sigmoid"), (True, "sigmoid"),
                                                     (False, ["sigmoid", "sft"])])
def test_a_token_budget_cuts_micro_batches_into_pieces_and_steps_alike(share_prompt, loss_type):
    """padding_free_max_tokens: each micro-batch of 3 pairs runs in pieces of at most 14 tokens (a pair is
    9-11 of them in two sequences, 7-9 with its prompt shared), and every logged number and the final
    weights are the uncut run's (sft's token mean too); the optimizer steps after every second micro-batch."""
    runs = {}
    for budget in (None, 14):
        run = worker(num_rows=12, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=3,
                     padding_free=True, padding_free_max_tokens=budget, share_prompt=share_prompt, engine=LlamaEngine,
                     loss_type=loss_type)
        if loss_type != "sigmoid":  # chosen completions of 1-3 tokens (pairs of 8-10), so that a piece's share
            # of the chosen tokens (sft's) is not its share of the pairs
            run.rows = Shard.from_rows([dict(row, chosen_ids=[8, 9, 10][:1 + row["index"] % 3]) for row in rows(12)])
        run.train()
        runs[budget] = run
    whole, cut = runs[None], runs[14]
    pieces = 2 if share_prompt else 3  # 7-9 tokens: 1 + 2 pairs or 2 + 1; 9-11: one pair a piece
    step = ["micro_batch"] * (2 * pieces) + ["optimizer_step"]
    assert cut.context.events == step + [("log", 1, False), ("report", 1)] + step + [("log", 2, False), ("report", 2)]
    assert whole.context.events.count("micro_batch") == 4
    assert len(whole.context.logged) == len(cut.context.logged) == 2
    for a, b in zip(whole.context.logged, cut.context.logged):
        for name in set(a) - {"step_time", "tokens_per_second_per_worker"}:
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-7), name
    for name, value in whole.engine.module.state_dict().items():
        # sft: its token shares add the same float32 terms in another order
        torch.testing.assert_close(cut.engine.module.state_dict()[name], value, rtol=0,
                                   atol=1e-7 if loss_type == "sigmoid" else 1e-6)


def test_fp16_overflow_skips_the_update_and_goes_on():
    """Under fp16 an overflowing step is DeepSpeed's loss scaler's to skip: the run goes on, and the step
    counts and is logged with its inf norm. In fp32 the same inf norm stops the run (the non-finite guard)."""
    def overflowing(scaler):
        return lambda events, accumulation: OverflowingEngine(events, accumulation, {2}, scaler)

    run = worker(max_steps=4, fp16=True, engine=overflowing(scaler=True))
    run.train()
    assert outline(run.context.events).count("skipped_step") == 1
    assert [row["global_step"] for row in run.context.logged] == [1, 2, 3, 4]
    norms = [row["grad_norm"] for row in run.context.logged]
    assert math.isinf(norms[1]) and all(math.isfinite(norm) and norm > 0 for norm in norms[:1] + norms[2:])

    fp32 = worker(max_steps=4, zero_stage=2, engine=overflowing(scaler=False))
    with pytest.raises(FloatingPointError, match="non-finite grad_norm .* at step 2"):
        fp32.train()
    assert [row["global_step"] for row in fp32.context.logged] == [1]


def test_flops_count_by_hand():
    from raydpo import flops

    config = TinyLM().config
    # per layer: q 8*2*4 + k,v 2*8*2*4 + o 2*4*8 + MLP 3*8*16 = 640; LM head 8*16 = 128
    assert flops.matmul_parameters(config) == 768
    # forward: 2 * 768 * t + 2 * layers * width * t^2 per sequence; policy 3 forwards, reference 1
    assert flops.step_flops(config, [3, 5]) == 4 * (2 * 768 * 8 + 2 * 8 * (9 + 25))
    assert flops.step_flops(config, [3, 5], reference_forward=False) == 3 * (2 * 768 * 8 + 2 * 8 * (9 + 25))
    assert flops.sequence_lengths(rows(1), max_length=4) == [4, 4]  # prompt 2 + chosen 2; prompt 2 + rejected 3 -> 4


def test_mfu_and_hfu_are_the_windows_flops_over_time_and_peak(monkeypatch):
    """On a GPU raydpo knows the peak of, each logged step has mfu: the window's model FLOPs (its rows'
    sequence lengths, flops.py) per second per worker, over the peak; and hfu: the FLOPs its batches
    ran (flops.hardware_flops), the same way. Elsewhere neither is logged."""
    from raydpo import flops
    from raydpo.data.batching import collate

    plain = worker(max_steps=2)
    plain.train()
    assert all("mfu" not in row and "hfu" not in row for row in plain.context.logged)
    monkeypatch.setattr(flops, "gpu_peak_flops", lambda dtype: 1e9)
    run = worker(max_steps=2, use_gpu=True)
    run.train()
    by_index = {row["index"]: row for row in rows(8)}
    config = run.engine.module.config
    for batch, row in zip(run.reference.batches, run.context.logged):
        batch_rows = [by_index[i] for i in batch]
        lengths = flops.sequence_lengths(batch_rows, run.config.max_length)
        expected = flops.step_flops(config, lengths) / row["step_time"] / 1e9
        assert row["mfu"] == pytest.approx(expected, rel=1e-6)
        ran = flops.hardware_flops(config, collate(batch_rows, 0, run.config.max_length))  # padded: share_prompt off
        assert row["hfu"] == pytest.approx(ran / row["step_time"] / 1e9, rel=1e-6)


def test_streamed_reference_without_a_pool_reads_the_cached_columns():
    """stream_ref_log_probs with a cached precompute of the rows starts no ReferencePool (trainer.fit):
    the workers' streamed reference then has no actors and reads the columns every batch carries."""
    from raydpo.reference import StreamedReference
    from raydpo.train.loop import build_reference

    config = DPOConfig(output_dir="unused", report_to="none", stream_ref_log_probs=True)
    spec = WorkerSpec(config=config.to_dict(), plan=training_plan(8, config), model="unused", ref_model=None,
                      tokenizer=None, pad_token_id=0, reference_pool=None)
    reference = build_reference(spec, config, {}, engine=None)
    assert isinstance(reference, StreamedReference) and reference.num_actors == 0


def test_local_checkpoint_keeper_follows_ray_trains_rule(tmp_path):
    """Local mode keeps checkpoints as Ray Train's CheckpointConfig would: the num_to_keep best by the score
    attribute (NaN worst, a tie to the later one) or the newest without one, never deleting
    the latest; the best is picked among those kept."""
    from raydpo.train.run_context import CheckpointKeeper

    def run(keeper, scores):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))  # one folder of checkpoints per keeper
        for step, score in enumerate(scores, start=1):
            (folder / f"checkpoint-{step}").mkdir(parents=True)
            keeper.add(str(folder / f"checkpoint-{step}"), {} if score is None else {"eval_loss": score})
        return sorted(int(p.name.split("-")[1]) for p in folder.iterdir())

    assert run(CheckpointKeeper(2, None), [0.5, 0.4, 0.3, 0.2]) == [3, 4]  # by age
    assert run(CheckpointKeeper(None, None), [0.5, 0.4, 0.3]) == [1, 2, 3]
    best = CheckpointKeeper(2, "eval_loss", "min")
    assert run(best, [0.3, 0.1, 0.2, 0.9]) == [2, 3, 4]  # the latest stays, however bad
    assert best.best("eval_loss", "min").endswith("-2") and best.latest.endswith("-4")
    assert run(CheckpointKeeper(1, "eval_loss", "min"), [float("nan"), 0.5, 0.4, 0.7]) == [3, 4]
    # Ray's quirk, kept so both modes agree: a missing score is -inf before "min" negates it, so it ranks best
    assert run(CheckpointKeeper(1, "eval_loss", "min"), [0.5, None, 0.4, 0.7]) == [2, 4]
    assert run(CheckpointKeeper(1, "eval_loss", "max"), [0.5, None, float("nan"), 0.7]) == [4]
    assert run(CheckpointKeeper(2, "eval_loss", "max"), [0.3, 0.3, 0.1, 0.0]) == [1, 2, 4]
    ties = CheckpointKeeper(1, "eval_loss", "max")
    assert run(ties, [0.3, 0.3, 0.3]) == [3]  # a tie ranks the later one higher

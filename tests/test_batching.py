import dataclasses

from raydpo.data.batching import epoch_order, micro_batches_per_epoch
from raydpo.train.spec import training_plan
from raydpo import DPOConfig


def test_epoch_order_is_deterministic_and_loses_no_row():
    a = epoch_order(10, num_batches=3, batch_size=4, seed=42, epoch=0)
    assert a == epoch_order(10, num_batches=3, batch_size=4, seed=42, epoch=0)
    assert a != epoch_order(10, num_batches=3, batch_size=4, seed=42, epoch=1)
    flat = [i for batch in a for i in batch]
    assert len(flat) == 12 and set(flat) == set(range(10))  # every row, two repeated to fill the last batch


def test_length_grouping_cuts_padding_and_keeps_every_row():
    import random

    from raydpo.data.batching import GROUP_SPAN

    lengths = [random.Random(i).randint(10, 500) for i in range(400)]
    plain = epoch_order(400, num_batches=100, batch_size=4, seed=1, epoch=0)
    grouped = epoch_order(400, num_batches=100, batch_size=4, seed=1, epoch=0, lengths=lengths)
    assert grouped == epoch_order(400, num_batches=100, batch_size=4, seed=1, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.2 * padding(plain)
    # the batch order is shuffled, not sorted by length across the epoch
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and GROUP_SPAN * 4 < 400


def test_plan_rounds_up_to_whole_steps():
    assert micro_batches_per_epoch(num_rows=9, world_size=2, batch_size=2, accumulation=2) == 4
    plan = training_plan(9, DPOConfig(num_workers=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                      num_train_epochs=1.5))
    assert dataclasses.asdict(plan) == {"micro_batches_per_epoch": 4, "steps_per_epoch": 2, "total_steps": 3, "eval_batches": 0}
    assert training_plan(9, DPOConfig(max_steps=7)).total_steps == 7

import dataclasses

import itertools
import random

import pytest

from raydpo.data.batching import (collate_padding_free, cut_pairs, epoch_order, micro_batches_per_epoch,
                                   padding_free_lengths, pieces_needed)
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


@pytest.mark.parametrize("share_prompt, max_length, mode", [(False, None, "keep_start"), (False, 7, "keep_end"),
                                                            (True, None, "keep_start"), (True, 7, "keep_start")])
def test_padding_free_lengths_are_the_rows_of_the_layout(share_prompt, max_length, mode):
    rng = random.Random(0)
    rows = [{"prompt_ids": [1] * rng.randint(1, 4), "chosen_ids": [2] * rng.randint(1, 5),
             "rejected_ids": [3] * rng.randint(1, 5)} for _ in range(6)]
    lengths = padding_free_lengths(rows, max_length, mode, share_prompt)
    whole = collate_padding_free(rows, 0, max_length, mode, share_prompt=share_prompt)
    assert sum(lengths) == whole.input_ids.shape[1]
    assert lengths == [collate_padding_free([row], 0, max_length, mode, share_prompt=share_prompt).input_ids.shape[1]
                       for row in rows]


def test_cut_pairs_gives_exactly_the_pieces_asked_within_the_budget():
    rng = random.Random(1)
    for _ in range(300):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
        budget = rng.randint(1, 20)
        needed = pieces_needed(lengths, budget)
        # the fewest contiguous pieces within the budget (a longer pair alone), by brute force
        fewest = min(len(cuts) + 1 for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k)
                     if all(sum(lengths[a:b]) <= budget or b - a == 1
                            for a, b in zip((0, *cuts), (*cuts, len(lengths)))))
        assert needed == fewest, (lengths, budget)
        for pieces in range(needed, len(lengths) + 1):
            ranges = cut_pairs(lengths, pieces, budget)
            assert len(ranges) == pieces and [i for r in ranges for i in r] == list(range(len(lengths)))
            assert all(len(r) == 1 or sum(lengths[i] for i in r) <= budget for r in ranges)
        with pytest.raises(ValueError, match="cannot be cut into"):
            cut_pairs(lengths, len(lengths) + 1, budget)

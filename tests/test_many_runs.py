"""One Ray session, many runs (issue 15): trainings of every kind (local mode too) and a sweep back to back
in one driver.

Every run must finish, give back its placement group and CPUs before the next one starts (a leftover
makes a later run wait forever at "Requesting resources"), and the last run, a repeat of the first,
must not start much slower than the first did."""

import statistics

from ray import tune

from raydpo import DPOConfig, DPOTrainer, cluster
from raydpo.tune import sweep

KINDS = [
    ("1 worker, ZeRO-0", dict(num_workers=1, zero_stage=0)),
    ("2 workers, ZeRO-2", dict(num_workers=2, zero_stage=2)),
    ("2 workers, ZeRO-3", dict(num_workers=2, zero_stage=3)),
    ("precomputed reference", dict(num_workers=1, precompute_ref_log_probs=True)),
    ("streamed reference", dict(num_workers=1, stream_ref_log_probs=True)),
    # local mode: the loop in this (the driver's) process, one DeepSpeed engine after another in it
    ("local mode, ZeRO-3", dict(num_workers=0, zero_stage=3)),
    ("local mode, ZeRO-0", dict(num_workers=0, zero_stage=0)),
    ("sweep", None),
    ("1 worker, ZeRO-0 again", dict(num_workers=1, zero_stage=0)),
]


def test_many_runs_in_one_session_all_finish_and_give_back_their_resources(ray_session, tiny_model, parity_rows,
                                                                          tmp_path):
    rows = parity_rows[:16]
    to_first_step = {}
    for i, (kind, overrides) in enumerate(KINDS):
        args = DPOConfig(output_dir=str(tmp_path / f"run{i}"), max_steps=2, logging_steps=1, save_strategy="no",
                         per_device_train_batch_size=4, max_length=32, learning_rate=1e-3, report_to="none",
                         **(overrides or {}))
        if overrides is None:
            result = sweep(tiny_model, rows, {"beta": tune.grid_search([0.1, 0.5])}, args=args, name="sweep",
                           max_concurrent_trials=1)
            assert [row["status"] for row in result.table] == ["ok", "ok"], kind
        else:
            out = DPOTrainer(tiny_model, args=args, train_dataset=rows).train()
            assert [h["global_step"] for h in out.history] == [1, 2], kind
            to_first_step[kind] = out.startup["total"]
        left = cluster.leftovers()
        assert not left["placement_groups"] and not left["cpus_in_use"], f"after {kind}: {left}"
    first, last = to_first_step["1 worker, ZeRO-0"], to_first_step["1 worker, ZeRO-0 again"]
    # generous: a 2-core machine's timings vary by tens of percent; a run left waiting on resources
    # (the failure this guards) waits for minutes
    assert last < 2.5 * first + 10, to_first_step
    assert max(to_first_step.values()) < 4 * statistics.median(to_first_step.values()) + 10, to_first_step

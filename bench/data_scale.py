"""Data at scale: tokenization throughput against TRL, and a training worker's data memory against
dataset size.

    .venv/bin/python bench/data_scale.py [--tokenize-rows 20000] [--sizes 2000,20000,50000,200000]
                                         [--old-sizes 2000,20000,50000]

Rows: hh-rlhf harmless-base pairs (../shared/data, 2,312 pairs, implicit prompt), repeated to size.
Tokenizer: SmolLM2-135M-Instruct's (49,152 tokens), from ~/.cache/raydpo/smollm2-135m-instruct.

(a) Tokenization, rows/s, from the same in-memory list of raw rows to tokenized rows, on the same
    cores (this machine's os.cpu_count()): raydpo's `prepare_dataset` (Ray Data map_batches in a
    Ray instance of that many CPUs, the checks of tokenize.finish included, no cache) against TRL
    1.16's own `DPOTrainer._prepare_dataset` (datasets' map: prompt extraction, EOS, tokenization and
    the keep_start filter) with dataset_num_proc = that many processes. Each side runs once on a
    small slice first, so neither pays its worker start-up in the timed run.

(b) A training worker's data memory: one Ray Train worker (TorchTrainer, its shard's block refs from
    `contiguous_shards`, raydpo's CPU worker environment, as `DPOTrainer.train` starts it) reads its
    shard and runs one epoch of micro-batches' rows from it (group_by_length order, batch 8), with no
    model. "arrow" is what the loop does now (a `Shard` of the blocks, `Shard.take` per batch); "rows"
    is what it did before (`list(iter_rows())`, a dict per row). Reported per size: the shard's Arrow
    bytes, and the worker's resident memory beyond its RSS before it read the shard: at the end
    (RSS, and USS: the pages private to the process) and at its peak (RSS sampled every 10 ms).
    The tokenized rows are tokenized once and repeated, in blocks of 256 rows (tokenize's map_batches
    size: the most blocks a shard gets).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare_trl import HH_RLHF  # noqa: E402

TOKENIZER = os.path.expanduser("~/.cache/raydpo/smollm2-135m-instruct")
MAX_LENGTH = 1024
BLOCK_ROWS = 256
BATCH = 8


def raw_rows(count: int) -> list:
    """hh-rlhf pairs as they are on disk ({"chosen", "rejected"}, the prompt implicit), repeated to count."""
    with gzip.open(HH_RLHF, "rt") as f:
        pairs = [json.loads(line) for line in f]
    return [dict(pairs[i % len(pairs)]) for i in range(count)]


# -- (a) tokenization ------------------------------------------------------------------------------

def raydpo_tokenize(rows: list, tokenizer) -> int:
    from raydpo import DPOConfig
    from raydpo.data.tokenize import prepare_dataset

    return prepare_dataset(rows, tokenizer, DPOConfig(max_length=MAX_LENGTH, report_to="none")).num_rows


def trl_tokenize(rows: list, tokenizer, num_proc: int) -> int:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.gettempdir(), max_length=MAX_LENGTH, dataset_num_proc=num_proc,
                     report_to="none", bf16=False, use_cpu=True)
    # TRL's own preparation; of the trainer it reads only the tokenizer (building a trainer would load a model)
    trainer = type("Prepare", (), {"_tokenizer": tokenizer})()
    return len(DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train"))


def tokenization(count: int, repeats: int) -> list:
    """(system, rows kept, [seconds of each repeat]); the systems alternate, so load from other
    processes on the machine falls on both."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    cores = os.cpu_count()
    rows = raw_rows(count)
    systems = [("raydpo (Ray Data)", lambda r: raydpo_tokenize(r, tokenizer)),
               ("TRL 1.16 (datasets.map)", lambda r: trl_tokenize(r, tokenizer, cores))]
    for _, run in systems:
        run(rows[:512])  # warm: Ray's task workers / datasets' first map
    results = {name: [0, []] for name, _ in systems}
    for repeat in range(repeats):
        for name, run in systems:
            started = time.perf_counter()
            results[name][0] = run(rows)
            results[name][1].append(time.perf_counter() - started)
            print(f"[bench] tokenize {name} #{repeat + 1}: {count} rows -> {results[name][0]} in "
                  f"{results[name][1][-1]:.1f} s", flush=True)
    return [(name, kept, seconds) for name, (kept, seconds) in results.items()]


# -- (b) worker memory -----------------------------------------------------------------------------

def tokenized_table():
    """The 2,312 pairs tokenized once by raydpo, as one Arrow table."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from raydpo import DPOConfig
    from raydpo.data.tokenize import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with gzip.open(HH_RLHF, "rt") as f:
        rows = [json.loads(line) for line in f]
    data = prepare_dataset(rows, tokenizer, DPOConfig(max_length=MAX_LENGTH, report_to="none"))
    return pa.concat_tables(data.dataset.iter_batches(batch_format="pyarrow", batch_size=None)).combine_chunks()


def repeated_dataset(table, size: int):
    """`size` rows, the table's rows repeated, in blocks of BLOCK_ROWS rows of their own buffers."""
    import numpy as np
    import ray

    blocks = [table.take(np.arange(start, min(start + BLOCK_ROWS, size)) % table.num_rows)
              for start in range(0, size, BLOCK_ROWS)]
    return ray.data.from_arrow(blocks).materialize()


def memory_loop(config: dict) -> None:
    """One worker: read the shard the way `mode` says, run an epoch of batches' rows, write the numbers."""
    import psutil
    import ray
    import ray.data

    from raydpo.data.batching import epoch_order
    from raydpo.data.shard import Shard

    process = psutil.Process()
    before_rss, before_uss = process.memory_info().rss, process.memory_full_info().uss
    peak, sampling = [before_rss], [True]

    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if config["mode"] == "arrow":
        rows = Shard(ray.get(config["blocks"]))
        lengths, take, nbytes = rows.lengths(MAX_LENGTH), rows.take, rows.nbytes
    else:  # the loop before data/shard.py
        rows = list(ray.data.from_arrow_refs(config["blocks"]).iter_rows())
        lengths = [min(MAX_LENGTH, len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])))
                   for r in rows]
        take, nbytes = (lambda indices: [rows[i] for i in indices]), 0
    read = time.perf_counter() - started
    tokens = 0
    for indices in epoch_order(len(rows), len(rows) // BATCH, BATCH, 42, 0, lengths):
        tokens += sum(len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
                      for row in take(indices))
    epoch = time.perf_counter() - read - started
    sampling[0] = False
    sampler.join()
    after_rss, after_uss = process.memory_info().rss, process.memory_full_info().uss
    with open(config["out"], "w") as f:
        json.dump({"rows": len(rows), "tokens": tokens, "nbytes": nbytes, "read_s": read, "epoch_s": epoch,
                   "rss": after_rss - before_rss, "uss": after_uss - before_uss, "peak": peak[0] - before_rss,
                   "base_rss": before_rss}, f)


def worker_memory(sizes: list, old_sizes: list) -> list:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raydpo.cluster import cpu_process_env
    from raydpo.data.shards import contiguous_shards

    table = tokenized_table()
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for size in sorted(set(sizes) | set(old_sizes)):
            dataset = repeated_dataset(table, size)
            for mode in ("arrow", "rows"):
                if (mode == "arrow" and size not in sizes) or (mode == "rows" and size not in old_sizes):
                    continue
                out = os.path.join(directory, f"{mode}-{size}.json")
                blocks = contiguous_shards(dataset, 1)[0]
                TorchTrainer(memory_loop, train_loop_config={"mode": mode, "out": out, "blocks": blocks},
                             scaling_config=ray.train.ScalingConfig(num_workers=1),
                             run_config=ray.train.RunConfig(name=f"data-scale-{mode}-{size}", storage_path=directory,
                                                            worker_runtime_env={"env_vars": cpu_process_env()})).fit()
                with open(out) as f:
                    result = {"mode": mode, **json.load(f)}
                results.append(result)
                print(f"[bench] memory {mode} {size}: {result}", flush=True)
            del dataset
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenize-rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2, help="timed tokenization runs per system, alternating")
    parser.add_argument("--sizes", default="2000,20000,50000,200000")
    parser.add_argument("--old-sizes", default="2000,20000,50000")
    args = parser.parse_args()
    from raydpo import cluster

    cores = os.cpu_count()
    cluster.connect("local", num_cpus=cores)
    tokenized = tokenization(args.tokenize_rows, args.repeats) if args.tokenize_rows else []
    memory = worker_memory([int(s) for s in args.sizes.split(",") if s],
                           [int(s) for s in args.old_sizes.split(",") if s])

    mib = 2 ** 20
    if tokenized:
        print(f"\n(a) tokenization: {args.tokenize_rows} hh-rlhf rows, SmolLM2 tokenizer, max_length {MAX_LENGTH}, "
              f"{cores} cores; best of {args.repeats} alternating runs (each run's seconds listed)")
        header = f"{'system':<26}{'rows kept':>10}{'best s':>8}{'rows/s':>9}{'vs TRL':>8}   runs s"
        print(header + "\n" + "-" * len(header))
        trl_rate = args.tokenize_rows / min(tokenized[-1][2])
        for name, kept, seconds in tokenized:
            rate = args.tokenize_rows / min(seconds)
            print(f"{name:<26}{kept:>10}{min(seconds):>8.1f}{rate:>9.0f}{rate / trl_rate:>7.2f}x   "
                  + " ".join(f"{s:.1f}" for s in seconds))
    if not memory:
        return
    print(f"\n(b) one worker's data memory beyond its RSS before reading the shard (MiB); an epoch of "
          f"batch-{BATCH} rows")
    header = (f"{'pairs':>8}{'mode':>7}{'tokens/pair':>12}{'shard MiB':>10}{'RSS end':>9}{'USS end':>9}"
              f"{'RSS peak':>10}{'peak KiB/pair':>14}{'read s':>8}{'epoch s':>9}")
    print(header + "\n" + "-" * len(header))
    for r in memory:
        print(f"{r['rows']:>8}{r['mode']:>7}{r['tokens'] / max(1, r['rows'] // BATCH * BATCH):>12.0f}"
              f"{r['nbytes'] / mib:>10.1f}{r['rss'] / mib:>9.1f}{r['uss'] / mib:>9.1f}{r['peak'] / mib:>10.1f}"
              f"{r['peak'] / 1024 / r['rows']:>14.2f}{r['read_s']:>8.1f}{r['epoch_s']:>9.1f}")


if __name__ == "__main__":
    main()

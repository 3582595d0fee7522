"""DPOConfig: the single source of settings for a run.

Field names follow TRL 1.16's DPOConfig so a TRL user changes only the import. Ray and DeepSpeed
settings are extra fields at the end. Every check runs at construction and names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

from raydpo.losses import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSSES, SORTING_LOSSES, TOKEN_MEAN_LOSSES
from raydpo.train.trackers import report_targets

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
TRUNCATION_MODES = ("keep_start", "keep_end")
EVAL_STRATEGIES = ("no", "steps", "epoch")
LOG_LEVELS = ("passive", "debug", "info", "warning", "error", "critical")  # transformers' TrainingArguments.log_level
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")  # transformers 5's SaveStrategy
# TrainingArguments.optim values raydpo builds as transformers' Trainer does (train/deepspeed.py).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor")
HUB_STRATEGIES = ("end", "every_save")  # of transformers' HubStrategy
# What model_init_kwargs["dtype"] may name (torch's floating dtypes, and from_pretrained's "auto").
MODEL_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half", "float64", "double")


@dataclass
class DPOConfig:
    # Each field's help is its metadata["help"] (HfArgumentParser shows it for `raydpo train -h`);
    # docs/configuration.md is generated from it (`python -m raydpo.config_docs`). The "# --- ... ---"
    # lines name the sections of that page.

    # --- where outputs go (TRL / transformers names) ---
    output_dir: str = field(default="outputs/raydpo", metadata={
        "help": "Checkpoints go to output_dir/<run_name>/checkpoint-<step> (unless storage_path is set)."})
    run_name: Optional[str] = field(default=None, metadata={
        "help": "The run's name: its folder under storage_path, and its MLflow / W&B run name. "
                "None: raydpo-<time>."})
    # (None first in the Union: an HfArgumentParser flag then takes one name, keeping the default, as TRL's does.)
    report_to: Union[None, str, List[str]] = field(default="tensorboard", metadata={
        "help": "Where logged metrics go: \"tensorboard\", \"mlflow\", \"wandb\", a list of them, \"all\" or "
                "\"none\" (raydpo/train/trackers.py; docs/output.md)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "transformers' TrainingArguments field: as there, the Trainer does not read it; a script passes "
                "it to train(resume_from_checkpoint=...), as TRL's dpo.py and `raydpo train` do."})

    # --- the Hugging Face Hub (transformers' names and defaults; docs/output.md) ---
    push_to_hub: bool = field(default=False, metadata={
        "help": "train() uploads the trained model (the returned checkpoint's model/ folder, with a model card) "
                "to hub_model_id when it ends, commit \"End of training\". `raydpo train` and TRL's scripts push "
                "through train() too."})
    hub_model_id: Optional[str] = field(default=None, metadata={
        "help": "The repo; None: the name of output_dir, in the token's namespace (as transformers)."})
    hub_strategy: str = field(default="every_save", metadata={
        "help": "\"every_save\": also push each checkpoint's model/ as it is saved (from the driver, commit "
                "\"Training in progress, step N\"), then the end push; \"end\": only the end push. transformers' "
                "\"checkpoint\" and \"all_checkpoints\" are refused by name."})
    hub_token: Optional[str] = field(default=None, repr=False, metadata={
        "help": "The Hub token; None: huggingface_hub's own (HF_TOKEN or a stored login). Kept out of the model "
                "card, the trackers' parameters and the config's repr."})
    hub_private_repo: Optional[bool] = field(default=None, metadata={
        "help": "A new repo's visibility; None: the Hub's default (or the existing repo's visibility)."})

    # --- optimisation ---
    learning_rate: float = field(default=1e-6, metadata={"help": "The peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={
        "help": "The scheduler, from transformers.get_scheduler, called as transformers' Trainer calls it."})
    lr_scheduler_kwargs: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "Passed to get_scheduler as scheduler_specific_kwargs (a dict, or JSON text): "
                "{\"min_lr_rate\": 0.1} (or {\"min_lr\": ...}) for cosine_with_min_lr, {\"num_decay_steps\": N} "
                "for warmup_stable_decay. A value that does not fit the scheduler fails on the driver, before "
                "any worker starts, with a ValueError naming the field."})
    warmup_steps: float = field(default=0, metadata={
        "help": "As in transformers 5: an int >= 1 is a number of steps (a float >= 1 is truncated, as "
                "get_warmup_steps does), a float in (0, 1) a ratio of the total steps, ceil(ratio * total). "
                "0 falls back to warmup_ratio."})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "transformers 4's field (transformers 5 dropped it): used when warmup_steps is 0."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "transformers' TrainingArguments.optim (its default, so TRL's, with torch >= 2.8): one of "
                "adamw_torch, adamw_torch_fused, sgd, adafactor, built with the class and arguments "
                "transformers' Trainer picks (Trainer.get_optimizer_cls_and_kwargs) and handed to DeepSpeed "
                "(train/deepspeed.py); any other name is refused when the config is built. A deepspeed config "
                "with its own \"optimizer\" section overrides it (as in transformers' Trainer), its \"auto\" "
                "values filled from this config; with ZeRO-Offload of the optimizer and no such section, the "
                "AdamW family is DeepSpeed's CPU Adam (same update). adafactor under ZeRO 1-3 sees ZeRO's flat "
                "partitions, so its factored moments and update clipping differ from an unsharded run (as "
                "with transformers' Trainer under ZeRO)."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "Decays every trainable weight except biases and LayerNorm/RMSNorm weights: the two parameter "
                "groups of transformers' Trainer (Trainer.get_decay_parameter_names)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW's epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Gradient clipping; the logged grad_norm is taken before clipping."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per worker per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=3.0, metadata={
        "help": "Epochs to train, when max_steps is -1."})
    max_steps: int = field(default=-1, metadata={
        "help": "Optimizer steps to train; > 0 overrides num_train_epochs, -1 uses it."})
    seed: int = field(default=42, metadata={
        "help": "The run's seed: torch's seed in each worker and each epoch's (length-grouped) shuffle."})

    # --- logging and checkpoints ---
    logging_steps: float = field(default=10, metadata={
        "help": "As in transformers 5 (TrainerState.compute_steps): an int >= 1 is a number of optimizer "
                "steps, a float in (0, 1) a ratio of the total steps, ceil(ratio * total); above 1 it must "
                "be whole."})
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step."})
    log_level: str = field(default="passive", metadata={
        "help": "transformers' name and values; what the run prints beside raydpo's own progress lines. "
                "\"passive\" keeps Ray Train's and Ray Data's per-step and per-dataset INFO lines out of the "
                "output (they still go to Ray's log files); \"debug\"/\"info\" show them; any value but "
                "\"passive\" also sets transformers' verbosity in the workers. Warnings and errors always "
                "show (docs/output.md)."})
    save_strategy: str = field(default="steps", metadata={
        "help": "\"steps\": every save_steps; \"epoch\": at each epoch's end; \"best\": when the eval metric "
                "of metric_for_best_model beats its best so far (needs evaluation); \"no\": never. Except "
                "with \"no\", the last step is always saved (save_model and push_to_hub export a checkpoint, "
                "so with \"no\" they have none)."})
    save_steps: float = field(default=500, metadata={
        "help": "Steps between saves under save_strategy \"steps\": an int, or a float in (0, 1), a ratio "
                "of the total steps (as logging_steps)."})

    # --- evaluation (transformers' names; docs/trainer.md "Evaluation and early stopping") ---
    eval_strategy: str = field(default="no", metadata={
        "help": "With an eval_dataset: \"steps\" evaluates every eval_steps, \"epoch\" at each epoch's end; "
                "the last step is always evaluated. Metrics are logged as \"eval_<name>\" (transformers' "
                "names)."})
    eval_steps: Optional[float] = field(default=None, metadata={
        "help": "An int, or a float in (0, 1): a ratio of the total steps (as logging_steps). "
                "None: logging_steps."})
    eval_on_start: bool = field(default=False, metadata={
        "help": "Also evaluate before the first step (transformers' sanity check): logged as a history row "
                "of its own at the starting step (0), not counted by early stopping or the best checkpoint."})
    per_device_eval_batch_size: int = field(default=8, metadata={
        "help": "Eval pairs per worker per forward (and per micro-batch of DPOTrainer.evaluate())."})
    load_best_model_at_end: bool = field(default=False, metadata={
        "help": "Rank checkpoints by metric_for_best_model (save_total_limit keeps the best), and return the "
                "best as TrainOutput.checkpoint and from save_model; every evaluation saves a checkpoint. As "
                "in transformers, save_strategy must equal eval_strategy unless it is \"best\", and with "
                "\"steps\" save_steps must be a multiple of eval_steps (two ratios may be; a ratio and a "
                "count may not)."})
    metric_for_best_model: Optional[str] = field(default=None, metadata={
        "help": "An eval metric, as transformers takes it: \"loss\" or \"eval_loss\", \"rewards/accuracies\" "
                "or \"eval_rewards/accuracies\" (\"eval/loss\" is accepted too). None: \"loss\"."})
    greater_is_better: Optional[bool] = field(default=None, metadata={
        "help": "Whether a larger metric_for_best_model is better. None: False for a loss, else True."})
    early_stopping_patience: Optional[int] = field(default=None, metadata={
        "help": "Stop after this many evaluations in a row without an improvement larger than "
                "early_stopping_threshold (transformers' EarlyStoppingCallback rule); the count is kept in "
                "checkpoints, so a restarted run keeps it."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "The improvement an evaluation must beat to reset early_stopping_patience."})

    # --- DPO (docs/losses.md) ---
    beta: float = field(default=0.1, metadata={"help": "DPO's beta: the rewards are beta times the log-ratios."})
    loss_type: Union[str, List[str]] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "One of TRL 1.16's fifteen loss types (raydpo/losses.py), or a list of them, weighted by "
                "loss_weights (MPO). TRL's default is the list [\"sigmoid\"]; a one-name list becomes that "
                "name."})
    loss_weights: Optional[List[float]] = field(default=None, metadata={
        "help": "One weight per loss_type; None: 1.0 each."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "In [0, 0.5]; enters only robust (< 0.5), exo_pair (> 0 needed), aot and aot_unpaired."})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "reverse_kl, forward_kl, js_divergence or alpha_divergence; other than reverse_kl only for "
                "the losses built on the chosen-rejected difference (docs/losses.md)."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "alpha of f_divergence_type \"alpha_divergence\"."})
    ld_alpha: Optional[float] = field(default=None, metadata={
        "help": "LD-DPO, in [0, 1]: the weight of the longer completion's tokens beyond the shorter one's "
                "length, in the policy's and the reference's log-probs alike. None: off."})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight each pair's loss by its completions' probability (no gradient through the "
                "weight). Refused with aot and aot_unpaired."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's temperature (> 0)."})
    max_length: Optional[int] = field(default=1024, metadata={
        "help": "Each prompt+completion sequence is truncated to this many tokens on its own, as in TRL. "
                "None: no truncation."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "keep_start or keep_end: which end of a too-long sequence stays. keep_end is refused for "
                "vision rows."})
    group_by_length: bool = field(default=True, metadata={
        "help": "transformers' name; raydpo's default is True (transformers' False). Rows of similar length "
                "share a micro-batch: each run of 50 batches of the seeded shuffle is sorted by length, cut "
                "into batches, and the batches are shuffled again; a pure function of (seed, epoch, "
                "lengths), so resumes and restarts stay exact. On hh-rlhf-like lengths it cuts padded "
                "positions to under a fifth (tested). False gives TRL's plain shuffle."})
    share_prompt: bool = field(default=True, metadata={
        "help": "raydpo only. Each pair is one sequence, prompt + chosen + rejected, with an attention mask "
                "that keeps rejected tokens from seeing chosen ones and position ids that restart where the "
                "completion starts, so every prompt is computed once instead of twice; used for a batch when "
                "truncation leaves every prompt whole (always with keep_start), for models whose logits are "
                "lm_head(final hidden state), with the sdpa or eager attention kernel (its mask is [B, 1, S, S]: "
                "flash_attention_2/3 and flex_attention fall back to the padded layout, with a logged reason), "
                "and not for vision or MoE-with-aux-loss batches. A sliding-window model (Mistral, Gemma 3) "
                "whose window max_length can pass also falls back, as one mask cannot carry a window, except "
                "in padding-free rows under sdpa, where raydpo's attention applies each layer's window; and "
                "so does a model on which a probe forward of the layout differs from the padded one (one "
                "that ignores position ids). The results equal TRL's two-sequence layout (tested against "
                "TRL)."})
    padding_free: bool = field(default=False, metadata={
        "help": "TRL's name (TRL 1.16 falls back to padding). Every sequence of a micro-batch end to end in "
                "one row, so no position holds a pad token: a block-diagonal attention mask keeps each pair "
                "to itself and position ids restart per sequence (with share_prompt, each pair's prompt once). "
                "Equal to the padded layout within 1e-5 (tested, every loss type). Two sequences per pair "
                "take any attention kernel (transformers builds its mask from the position ids; "
                "FlashAttention runs them as variable-length sequences); a shared prompt needs a dense "
                "[1, 1, S, S] mask, so with flash_attention_2/3 or flex_attention share_prompt is turned "
                "off, with a logged reason. Under sdpa, raydpo's attention runs each sequence (or pair) "
                "alone rather than the whole row under that mask, within each layer's sliding window where "
                "the model has one. Each process tries the layout on its model first (two probe pairs, padded "
                "and laid out, one forward each) and turns it off, with a logged reason, where the log-probs "
                "differ (a model whose mask ignores position ids: OPT under eager attention); "
                "also off for models whose layers carry state from one sequence into the next "
                "(linear-attention or other layer_types than full and sliding attention). Refused for vision "
                "rows."})
    padding_free_max_tokens: Optional[int] = field(default=None, metadata={
        "help": "A raydpo extra, with padding_free: the most tokens a training micro-batch's row may hold. "
                "Each micro-batch of per_device_train_batch_size pairs is cut, between pairs, into as few "
                "pieces as keep every piece within the budget (a pair longer than it runs alone); every "
                "worker runs the same number of pieces (the most any of them needs), and each piece's loss "
                "counts by its share of the micro-batch's pairs (sft's, a mean over chosen tokens, by its share "
                "of those), so an optimizer step still sums to the whole batch's: the step equals the uncut "
                "one (tested within 1e-5). The activations of a forward scale with the budget rather than "
                "with the longest pairs. Refused with the losses that sort the micro-batch's pairs (aot, "
                "aot_unpaired), with sft beside use_weighting, and with an MoE load-balancing loss; "
                "evaluation batches are not cut. None: micro-batches are not cut."})

    # --- data (raydpo extras; docs/data-formats.md) ---
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip rows that can't be trained on (malformed, or a prompt that fills max_length under "
                "keep_start) with a warning that counts them per reason, instead of raising on the first "
                "one."})
    dataset_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Cache tokenized datasets as parquet in this local folder, keyed by source data, split, "
                "map_fn's source and tokenizer. None: no cache."})

    # --- model (TRL names) ---
    model_init_kwargs: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "from_pretrained's keyword arguments (a dict, or JSON text). \"dtype\" (or transformers 4's "
                "\"torch_dtype\") may name a torch dtype, e.g. \"bfloat16\", or be \"auto\"; the default is "
                "float32."})
    router_aux_loss_coef: Optional[float] = field(default=None, metadata={
        "help": "Mixture-of-Experts models (TRL's field and rule): the weight of the router's load-balancing "
                "loss added to the DPO loss, logged as aux_loss. None: the model config's own "
                "router_aux_loss_coef (e.g. Mixtral's 0.001); 0.0 turns it off. Only for a model whose config "
                "has output_router_logits; another value for another model is an error. With it, batches use "
                "the two-sequence layout."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Set dropout to 0 in the policy, the reference and PEFT adapters."})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "help": "Recompute activations in the backward to save memory (transformers' "
                "gradient_checkpointing_enable; equal to off within 1e-5 in fp32, tests/test_gradient_checkpointing.py). "
                "None: TRL 1.16's default (True) on GPU workers, False on CPU workers, where the recomputation "
                "costs time and memory is rarely short. The numbers are the same either way."})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bfloat16 mixed precision as TRL runs it on one process: float32 weights, matmuls under torch "
                "autocast (DeepSpeed's torch_autocast; gradients reduced in float32); every reference mode "
                "computes the same way. A DeepSpeed config with bf16.enabled=true gets DeepSpeed's bf16 instead "
                "(bf16 weights, fp32 master weights). None: True on GPU workers that support it (TRL's default), "
                "False on CPU workers, unless the DeepSpeed config sets bf16.enabled. A DeepSpeed config that "
                "says otherwise is an error."})
    fp16: bool = field(default=False, metadata={
        "help": "float16 mixed precision with DeepSpeed's dynamic loss scaler: a step whose gradients "
                "overflow is skipped (and logged), not a stop. A DeepSpeed config that says otherwise is an error. "
                "CPU workers need float16 arithmetic (AVX512-FP16 or AMX-FP16); elsewhere it is refused."})
    tf32: Optional[bool] = field(default=None, metadata={
        "help": "TF32 matmuls on NVIDIA Ampere or newer GPU workers (torch.backends.cuda.matmul.allow_tf32). "
                "None leaves torch's default. Refused for CPU workers."})
    gradient_checkpointing_kwargs: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "Keyword arguments of gradient_checkpointing_enable (torch.utils.checkpoint's), a dict or JSON "
                "text. use_reentrant is False unless set here, as TRL sets it."})

    # --- reference model (TRL names; docs/reference-modes.md) ---
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute the reference log-probs once, before training, in a pool of Ray actors; the workers "
                "then hold no reference. Refused with sync_ref_model and with vision rows."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "TR-DPO: every ref_model_sync_steps the in-worker reference becomes alpha * policy + "
                "(1 - alpha) * reference. Refused with PEFT and precompute_ref_log_probs."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={
        "help": "TR-DPO's alpha, in [0, 1]."})
    ref_model_sync_steps: int = field(default=512, metadata={
        "help": "TR-DPO: optimizer steps between reference syncs."})

    # --- reference modes (raydpo extras; docs/reference-modes.md) ---
    precompute_ref_batch_size: Optional[int] = field(default=None, metadata={
        "help": "precompute_ref_log_probs or stream_ref_log_probs: pairs per reference forward in the "
                "actors. None: per_device_train_batch_size."})
    precompute_ref_num_actors: int = field(default=1, metadata={
        "help": "Reference actors, each with its own copy of the reference."})
    precompute_ref_resources: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "Ray resources of one reference actor (a dict, or JSON text). None: on GPUs, a GPU each when "
                "there are enough, else an equal fraction of one (precomputed: all the cluster's GPUs, before "
                "training; streamed: the GPUs the training workers leave, else stream_ref_gpu_fraction of "
                "theirs); on CPUs {\"CPU\": 1}, or streamed, half the CPUs the training workers may share, "
                "split over the actors, at most 1 each. A request the cluster cannot hold is refused."})
    precompute_ref_cache_dir: Optional[str] = field(default="~/.cache/raydpo/ref_logps", metadata={
        "help": "Precomputed log-probs are cached here, keyed by (reference model, tokenized rows, settings), "
                "so a second run and every sweep trial skip the reference forward. None turns the cache off."})
    stream_ref_log_probs: bool = field(default=False, metadata={
        "help": "The actor pool computes the reference log-probs while training runs; training starts at "
                "once. A cached precompute for the same rows is used instead when there is one. Refused with "
                "precompute_ref_log_probs and sync_ref_model."})
    stream_ref_prefetch_batches: int = field(default=2, metadata={
        "help": "How many micro-batches ahead of the one it trains on each worker sends to the pool."})
    stream_ref_gpu_fraction: float = field(default=0.25, metadata={
        "help": "stream_ref_log_probs on GPUs, when the cluster has no GPU beyond the training workers': the "
                "share of each worker's GPU that the reference actors take (Ray fractional GPUs; each worker "
                "asks for the rest). The default is about the reference's part of the work there: one forward "
                "against the policy's forward and backward. A scheduling share, not a memory limit. In (0, 0.5): "
                "a worker must ask for more than half a GPU, so that Ray never puts two workers on one."})

    # --- Ray and DeepSpeed (docs/clusters.md) ---
    num_workers: int = field(default=1, metadata={
        "help": "Ray Train workers. 0 is local mode (Ray Train's num_workers=0): the loop runs in this "
                "(the driver's) process as one worker, with no worker processes to start, for quick runs, "
                "notebooks and debugging. Data, reference actors, checkpoints and logs work as with workers; "
                "a failed run is not restarted (max_failures must be 0), and a sweep needs workers."})
    use_gpu: Optional[bool] = field(default=None, metadata={
        "help": "One GPU per training worker (and a GPU share per reference actor). None: GPUs when the Ray "
                "cluster has any, or its autoscaler can start nodes that have them (when the trainer connects), "
                "else CPUs."})
    resources_per_worker: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "Ray resources of one training worker, e.g. {\"CPU\": 0.5} (a dict, or JSON text). None sizes "
                "it from the cluster: CPU workers share all but one of the cluster's CPUs, so Ray Data's tasks "
                "are never starved; GPU workers take one GPU each (less stream_ref_gpu_fraction when "
                "streamed reference actors share their GPUs). A request the cluster cannot hold is refused."})
    deepspeed: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "A DeepSpeed config: a dict, JSON text, or a path to a JSON file. None uses raydpo's default; "
                "\"auto\" values and missing batch, accumulation, clipping and optimizer fields are filled "
                "from this config."})
    zero_stage: Optional[int] = field(default=None, metadata={
        "help": "ZeRO stage 0-3, used when the DeepSpeed config sets none. None: 0 for one worker (nothing "
                "to shard, and ZeRO-2's gradient bucketing costs time: bench/RESULTS.md), else 2."})
    storage_path: Optional[str] = field(default=None, metadata={
        "help": "Where Ray Train persists checkpoints (a local path or a URI; shared storage on a "
                "multi-node cluster). None: output_dir."})
    ray_address: Optional[str] = field(default=None, metadata={
        "help": "The Ray cluster to join. None: RAY_ADDRESS if set, else an embedded local Ray."})
    torch_threads_per_worker: Optional[int] = field(default=None, metadata={
        "help": "Threads each worker's torch uses. None divides the node's cores among the workers on "
                "that node (and, in a CPU sweep, among concurrent trials)."})

    # --- reliability (docs/reliability.md) ---
    max_failures: int = field(default=0, metadata={
        "help": "Ray Train restarts the worker group from the latest checkpoint up to this many times "
                "(-1: without limit)."})
    save_total_limit: Optional[int] = field(default=None, metadata={
        "help": "Keep only the newest K checkpoints (the best one too, with load_best_model_at_end). "
                "None keeps all."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run remote code in a model repo; only when asked for."})

    # --- accepted for TRL configs, with no effect (docs/cli.md) ---
    remove_unused_columns: bool = field(default=True, metadata={
        "help": "Accepted at either value, with no effect: TRL's DPOTrainer keeps the columns DPO reads "
                "(prompt, chosen, rejected, images, tools) whatever this says, and raydpo reads only those."})

    def __post_init__(self):
        self._parse_json_fields()
        if isinstance(self.loss_type, (list, tuple)) and len(self.loss_type) == 1:
            self.loss_type = self.loss_type[0]

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"DPOConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
            positive(name)
        positive("num_workers", allow_zero=True)  # 0: local mode
        if self.num_workers == 0 and self.max_failures != 0:
            raise ValueError(f"DPOConfig.max_failures={self.max_failures} needs workers: with num_workers=0 (local "
                             "mode) the loop runs in this process, which nothing restarts; set max_failures=0")
        self._check_step_counts()
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "num_train_epochs", "beta"):
            positive(name, allow_zero=True)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"DPOConfig.warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"DPOConfig.max_steps must be -1 (use num_train_epochs) or > 0, got {self.max_steps!r}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("DPOConfig.num_train_epochs must be > 0 when max_steps is -1")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"DPOConfig.lr_scheduler_type must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.lr_scheduler_kwargs is not None and not isinstance(self.lr_scheduler_kwargs, dict):
            raise ValueError(f"DPOConfig.lr_scheduler_kwargs must be a dict or None, got {self.lr_scheduler_kwargs!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"DPOConfig.optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"DPOConfig.truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"DPOConfig.max_length must be None or >= 2, got {self.max_length!r}")
        self._check_loss_options()
        if self.router_aux_loss_coef is not None and (isinstance(self.router_aux_loss_coef, bool)
                                                      or not isinstance(self.router_aux_loss_coef, (int, float))):
            raise ValueError(f"DPOConfig.router_aux_loss_coef must be a number or None, "
                             f"got {self.router_aux_loss_coef!r}")
        self._check_reference_options()
        self._check_eval_options()
        if self.max_failures < -1:
            raise ValueError(f"DPOConfig.max_failures must be >= -1, got {self.max_failures!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"DPOConfig.save_total_limit must be None or >= 1, got {self.save_total_limit!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"DPOConfig.zero_stage must be None, 0, 1, 2 or 3, got {self.zero_stage!r}")
        if isinstance(self.deepspeed, str) and not os.path.isfile(self.deepspeed):
            raise ValueError(f"DPOConfig.deepspeed: no DeepSpeed config file at {self.deepspeed!r}")
        if self.deepspeed is not None and not isinstance(self.deepspeed, (str, dict)):
            raise ValueError("DPOConfig.deepspeed must be a dict, a path to a JSON file, or None")
        self._check_precision()
        if self.resources_per_worker is not None and not isinstance(self.resources_per_worker, dict):
            raise ValueError("DPOConfig.resources_per_worker must be a dict like {'CPU': 0.5} or None")
        report_targets(self.report_to)  # names the unknown target
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"DPOConfig.log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.hub_strategy not in HUB_STRATEGIES:
            other = " (transformers' checkpoint-folder strategies are not supported)" if self.hub_strategy in (
                "checkpoint", "all_checkpoints") else ""
            raise ValueError(f"DPOConfig.hub_strategy must be one of {HUB_STRATEGIES}, got {self.hub_strategy!r}"
                             + other)

    def _check_precision(self):
        """bf16 and fp16 exclude each other, and a DeepSpeed config's "enabled" that is not "auto" must
        agree with them (as transformers' Trainer checks its DeepSpeed config)."""
        if self.bf16 and self.fp16:
            raise ValueError("DPOConfig.bf16 and DPOConfig.fp16 cannot both be True")
        if self.tf32 and self.use_gpu is False:
            raise ValueError("DPOConfig.tf32=True needs GPU workers (NVIDIA Ampere or newer); use_gpu is False")
        for name, ours in (("bf16", self.bf16), ("fp16", self.fp16)):
            enabled = self.deepspeed_enabled(name)
            if enabled is not None and ours is not None and enabled != ours:
                raise ValueError(f"DPOConfig.{name}={ours} contradicts the DeepSpeed config's "
                                 f"{name}.enabled={enabled}: set one of them to agree (or \"auto\")")
        # bf16 sets DeepSpeed's torch_autocast section itself (precision.fill_deepspeed) and runs every
        # reference under the same autocast; a section of the user's own would leave the references out.
        if ((self.deepspeed_dict() or {}).get("torch_autocast") or {}).get("enabled"):
            raise ValueError("DPOConfig.deepspeed: set bf16=True instead of a torch_autocast section; raydpo fills "
                             "that section itself and computes every reference under the same autocast")

    def _parse_json_fields(self):
        """Dict fields given as JSON text (a command-line flag), as transformers' TrainingArguments takes them;
        deepspeed's text is a file path unless it starts with "{"."""
        for name in ("lr_scheduler_kwargs", "model_init_kwargs", "resources_per_worker", "precompute_ref_resources",
                     "gradient_checkpointing_kwargs", "deepspeed"):
            value = getattr(self, name)
            if not isinstance(value, str) or (name == "deepspeed" and not value.lstrip().startswith("{")):
                continue
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"DPOConfig.{name} must be a dict, or a JSON object as text; {value!r} is not valid "
                                 f"JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"DPOConfig.{name} must be a dict, or a JSON object as text; got {value!r}")
            setattr(self, name, value)
        if self.gradient_checkpointing_kwargs is not None and not isinstance(self.gradient_checkpointing_kwargs, dict):
            raise ValueError("DPOConfig.gradient_checkpointing_kwargs must be a dict or None, got "
                             f"{self.gradient_checkpointing_kwargs!r}")
        if self.model_init_kwargs is not None:
            if not isinstance(self.model_init_kwargs, dict):
                raise ValueError(f"DPOConfig.model_init_kwargs must be a dict or None, got {self.model_init_kwargs!r}")
            for key in ("dtype", "torch_dtype"):
                dtype = self.model_init_kwargs.get(key)
                if isinstance(dtype, str) and dtype not in MODEL_DTYPES:
                    raise ValueError(f"DPOConfig.model_init_kwargs[{key!r}] must be one of {MODEL_DTYPES} "
                                     f"(or a torch.dtype), got {dtype!r}")

    def _check_step_counts(self):
        """A count of steps, or a ratio of the total steps when in (0, 1). As transformers, a count above 1
        must be whole (warmup_steps excepted: get_warmup_steps truncates it)."""
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is None and name == "eval_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"DPOConfig.{name} must be an int >= 1 or a ratio of the total steps in (0, 1), "
                                 f"got {value!r}")
            if value >= 1:
                if value != int(value):
                    raise ValueError(f"DPOConfig.{name} must be an integer when > 1 (a float in (0, 1) is a ratio "
                                     f"of the total steps), got {value!r}")
                setattr(self, name, int(value))

    def _check_loss_options(self):
        types = self.loss_types
        for loss in types:
            if loss not in LOSSES:
                raise ValueError(f"DPOConfig.loss_type {loss!r} is unknown; valid loss types: {sorted(LOSSES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"DPOConfig.loss_weights has {len(self.loss_weights)} weights but loss_type has "
                             f"{len(types)} losses")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5], got {self.label_smoothing!r}")
        if "robust" in types and not self.label_smoothing < 0.5:  # robust divides by 1 - 2 * label_smoothing
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5) for loss_type 'robust', "
                             f"got {self.label_smoothing!r}")
        if "exo_pair" in types and self.label_smoothing == 0.0:  # exo_pair takes log(label_smoothing)
            raise ValueError("DPOConfig.label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper "
                             "recommends 1e-3)")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"DPOConfig.f_divergence_type must be one of {F_DIVERGENCES}, "
                             f"got {self.f_divergence_type!r}")
        unsupported = [t for t in types if t not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and unsupported:
            raise ValueError(f"DPOConfig.f_divergence_type={self.f_divergence_type!r} works only with loss_type in "
                             f"{sorted(F_DIVERGENCE_LOSSES)}; {unsupported} need f_divergence_type='reverse_kl'")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"DPOConfig.ld_alpha must be None or in [0, 1], got {self.ld_alpha!r}")
        sorting = [t for t in types if t in SORTING_LOSSES]
        if self.use_weighting and sorting:  # these losses sort the pairs, so per-pair weights would not line up
            raise ValueError(f"DPOConfig.use_weighting cannot be combined with loss_type {sorting}")
        if self.discopop_tau <= 0:
            raise ValueError(f"DPOConfig.discopop_tau must be > 0, got {self.discopop_tau!r}")
        if self.padding_free_max_tokens is not None:
            if not self.padding_free:
                raise ValueError("DPOConfig.padding_free_max_tokens is a budget for padding-free rows: set "
                                 "padding_free=True with it, or leave it None")
            if self.padding_free_max_tokens < 1:
                raise ValueError(f"DPOConfig.padding_free_max_tokens must be >= 1, got {self.padding_free_max_tokens!r}")
            if sorting:  # they sort the whole micro-batch, which the budget cuts
                raise ValueError(f"DPOConfig.padding_free_max_tokens cannot be combined with loss_type {sorting}: "
                                 "they sort the pairs of the whole micro-batch")
            token_mean = [t for t in types if t in TOKEN_MEAN_LOSSES]
            if token_mean and self.use_weighting:  # a token mean times a mean of WPO weights does not add up by piece
                raise ValueError(f"DPOConfig.padding_free_max_tokens cannot be combined with loss_type {token_mean} "
                                 "and use_weighting: the micro-batch's token mean times its mean WPO weight is not a "
                                 "sum over pieces")

    def _check_reference_options(self):
        if self.sync_ref_model and self.precompute_ref_log_probs:  # a synced reference makes precomputed logps stale
            raise ValueError("DPOConfig.sync_ref_model cannot be combined with precompute_ref_log_probs")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"DPOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha!r}")
        if self.ref_model_sync_steps <= 0:
            raise ValueError(f"DPOConfig.ref_model_sync_steps must be > 0, got {self.ref_model_sync_steps!r}")
        if self.stream_ref_log_probs and (self.precompute_ref_log_probs or self.sync_ref_model):
            raise ValueError("DPOConfig.stream_ref_log_probs is a reference mode of its own: it cannot be combined "
                             "with precompute_ref_log_probs or sync_ref_model")
        if self.stream_ref_prefetch_batches < 0:
            raise ValueError(f"DPOConfig.stream_ref_prefetch_batches must be >= 0, got {self.stream_ref_prefetch_batches!r}")
        if not 0 < self.stream_ref_gpu_fraction < 0.5:
            raise ValueError(f"DPOConfig.stream_ref_gpu_fraction must be in (0, 0.5), "
                             f"got {self.stream_ref_gpu_fraction!r}")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size <= 0:
            raise ValueError(f"DPOConfig.precompute_ref_batch_size must be None or > 0, "
                             f"got {self.precompute_ref_batch_size!r}")
        if self.precompute_ref_num_actors <= 0:
            raise ValueError(f"DPOConfig.precompute_ref_num_actors must be > 0, got {self.precompute_ref_num_actors!r}")
        if self.precompute_ref_resources is not None and not isinstance(self.precompute_ref_resources, dict):
            raise ValueError("DPOConfig.precompute_ref_resources must be a dict like {'CPU': 1} or None")

    def _check_eval_options(self):
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(f"DPOConfig.eval_strategy must be one of {EVAL_STRATEGIES}, got {self.eval_strategy!r}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(f"DPOConfig.eval_steps must be None or > 0, got {self.eval_steps!r}")
        if self.per_device_eval_batch_size <= 0:
            raise ValueError(f"DPOConfig.per_device_eval_batch_size must be > 0, got {self.per_device_eval_batch_size!r}")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError(f"DPOConfig.early_stopping_patience must be None or > 0, "
                             f"got {self.early_stopping_patience!r}")
        if (self.load_best_model_at_end or self.early_stopping_patience) and self.eval_strategy == "no":
            raise ValueError("DPOConfig.load_best_model_at_end and early_stopping_patience need evaluation: "
                             "set eval_strategy to 'steps' or 'epoch' (and pass an eval_dataset)")
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(f"DPOConfig.save_strategy must be one of {SAVE_STRATEGIES}, got {self.save_strategy!r}")
        if self.save_strategy == "best" and self.eval_strategy == "no":
            raise ValueError("DPOConfig.save_strategy='best' saves when the eval metric improves: set eval_strategy "
                             "to 'steps' or 'epoch' (and pass an eval_dataset)")
        if self.load_best_model_at_end and self.save_strategy != "best":
            self._check_best_model_saves()

    def _check_best_model_saves(self):
        """transformers' rule: every checkpoint must carry the eval metric it is ranked by."""
        if self.save_strategy != self.eval_strategy:
            raise ValueError(f"DPOConfig.load_best_model_at_end requires save_strategy to match eval_strategy, "
                             f"except when save_strategy='best' (as in transformers), but found "
                             f"eval_strategy={self.eval_strategy!r}, save_strategy={self.save_strategy!r}")
        save, every = self.save_steps, self.eval_interval
        if self.eval_strategy != "steps" or save % every == 0:
            return
        if (save < 1) != (every < 1):
            raise ValueError(f"DPOConfig.load_best_model_at_end needs save_steps to be a multiple of eval_steps, "
                             f"which cannot be guaranteed when mixing a ratio and a step count: save_steps {save}, "
                             f"eval_steps {every}")
        if save >= 1 or (save * 1_000_000) % (every * 1_000_000):  # two ratios: transformers' test
            raise ValueError(f"DPOConfig.load_best_model_at_end needs save_steps ({save}) to be a multiple of "
                             f"eval_steps ({every})")

    @property
    def world_size(self) -> int:
        """Processes the loop runs in: num_workers, or 1 in local mode (num_workers=0)."""
        return max(1, self.num_workers)

    @property
    def eval_interval(self) -> Union[int, float]:
        """Optimizer steps between evaluations under eval_strategy="steps" (a ratio until the loop resolves
        it against the total steps: schedule.resolve_ratios)."""
        return self.eval_steps or self.logging_steps

    @property
    def best_metric(self) -> tuple:
        """(metric name in the logs, "max" or "min") that ranks checkpoints and drives early stopping."""
        name = self.metric_for_best_model or "loss"
        for prefix in ("eval_", "eval/"):  # "eval_loss" as transformers spells it; "eval/loss" as an alias
            name = name[len(prefix):] if name.startswith(prefix) else name
        greater = self.greater_is_better if self.greater_is_better is not None else not name.endswith("loss")
        return f"eval_{name}", "max" if greater else "min"

    @property
    def loss_types(self) -> list:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_types)

    def deepspeed_dict(self) -> Optional[dict]:
        """The user's DeepSpeed config as a dict (read from the file when a path was given)."""
        if isinstance(self.deepspeed, str):
            with open(self.deepspeed) as f:
                return json.load(f)
        return self.deepspeed

    def deepspeed_enabled(self, section: str) -> Optional[bool]:
        """What the user's DeepSpeed config says of `section` ("bf16" or "fp16"): its "enabled" as a
        bool, or None when the section is missing or "auto" (filled from this config)."""
        enabled = ((self.deepspeed_dict() or {}).get(section) or {}).get("enabled", "auto")
        return None if enabled == "auto" else bool(enabled)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_names() -> set:
    return {f.name for f in dataclasses.fields(DPOConfig)}


def config_from_dict(values: dict) -> DPOConfig:
    """Build a DPOConfig from a plain dict, naming any unknown key."""
    unknown = sorted(set(values) - _field_names())
    if unknown:
        raise ValueError(f"unknown DPOConfig field(s): {unknown}")
    return DPOConfig(**values)


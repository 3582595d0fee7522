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

from raydpo.losses import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSSES, SORTING_LOSSES
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
    # --- where outputs go (TRL / transformers names) ---
    output_dir: str = "outputs/raydpo"
    run_name: Optional[str] = None
    # Where logged metrics go: "tensorboard", "mlflow", "wandb" (a list, "all" or "none"); train/trackers.py.
    # (None first: an HfArgumentParser flag then takes one name, keeping the default, as TRL's does.)
    report_to: Union[None, str, List[str]] = "tensorboard"
    # transformers' TrainingArguments.resume_from_checkpoint: as there, the Trainer does not read it; a
    # script passes it to train(resume_from_checkpoint=...), as TRL's dpo.py and `raydpo train` do.
    resume_from_checkpoint: Optional[str] = None
    # --- the Hugging Face Hub (transformers' names and defaults; README "Uploading to the Hugging Face Hub") ---
    # push_to_hub: train() uploads the trained model (save_model's folder, with a model card) to
    # hub_model_id (None: the name of output_dir, in the token's namespace). hub_strategy "every_save" also
    # uploads each saved checkpoint's model while training runs; "end" only at the end. `raydpo train` and
    # TRL's scripts push through train() too.
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_strategy: str = "every_save"
    hub_token: Optional[str] = dataclasses.field(default=None, repr=False)  # None: huggingface_hub's own
    hub_private_repo: Optional[bool] = None  # None: the Hub's default (or the existing repo's visibility)

    # --- optimisation ---
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    # Passed to transformers.get_scheduler as scheduler_specific_kwargs, e.g. {"min_lr_rate": 0.1} for
    # "cosine_with_min_lr" or {"num_decay_steps": 100} for "warmup_stable_decay".
    lr_scheduler_kwargs: Optional[Union[dict, str]] = None
    # An int >= 1: steps (a float >= 1 is truncated, as transformers' get_warmup_steps does); a float in
    # (0, 1): a ratio of the total steps, ceil(ratio * total). 0 falls back to warmup_ratio.
    warmup_steps: float = 0
    warmup_ratio: float = 0.0  # transformers 4's name (gone from transformers 5); warmup_steps wins when > 0
    # transformers' TrainingArguments.optim; "adamw_torch_fused" is its default with torch >= 2.8, so TRL's.
    # A DeepSpeed config with its own "optimizer" section overrides it (as in transformers' Trainer).
    optim: str = "adamw_torch_fused"
    # Biases and LayerNorm/RMSNorm weights are not decayed (transformers' get_decay_parameter_names).
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    seed: int = 42

    # --- logging and checkpoints ---
    # logging_steps, save_steps and eval_steps: an int >= 1 is a number of optimizer steps, a float in
    # (0, 1) a ratio of the total steps, ceil(ratio * total) (transformers' TrainerState.compute_steps).
    logging_steps: float = 10
    logging_first_step: bool = False  # also log after step 1
    # transformers' name and values. What the run prints beside raydpo's own progress lines: "passive"
    # (the default) keeps Ray Train's and Ray Data's per-step and per-dataset INFO lines out of the
    # output (they still go to Ray's log files); "debug"/"info" show them, "warning"/"error"/"critical"
    # also set transformers' verbosity in the workers. Warnings and errors always show.
    log_level: str = "passive"
    # "steps": every save_steps; "epoch": at each epoch's end; "best": when the eval metric of
    # metric_for_best_model beats its best so far; "no": never. Except with "no", the last step is
    # always saved (save_model and push_to_hub need a checkpoint).
    save_strategy: str = "steps"
    save_steps: float = 500

    # --- evaluation (transformers' names; README "Evaluation and early stopping") ---
    # With an eval_dataset: "steps" evaluates every eval_steps (None: logging_steps), "epoch" at each
    # epoch's end; the last step is always evaluated. Metrics are logged as "eval_<name>" (transformers' names).
    eval_strategy: str = "no"
    eval_steps: Optional[float] = None
    # Evaluate before the first step too (a sanity check, as in transformers): logged at the starting
    # step; neither early stopping nor the best checkpoint counts it.
    eval_on_start: bool = False
    per_device_eval_batch_size: int = 8
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None  # e.g. "loss" or "rewards/accuracies" (of the eval set)
    greater_is_better: Optional[bool] = None  # None: False for a loss, True otherwise
    # Stop after this many evaluations without an improvement larger than the threshold
    # (transformers' EarlyStoppingCallback arguments).
    early_stopping_patience: Optional[int] = None
    early_stopping_threshold: float = 0.0

    # --- DPO ---
    beta: float = 0.1
    # A name or a list of names (TRL's default is the list ["sigmoid"]); a one-name list becomes that name.
    loss_type: Union[str, List[str]] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[List[float]] = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: Optional[float] = None
    use_weighting: bool = False
    discopop_tau: float = 0.05
    max_length: Optional[int] = 1024
    truncation_mode: str = "keep_start"
    # transformers' name. raydpo's default is True: rows of similar length share a batch (seeded, so
    # runs and restarts stay reproducible). False gives TRL's plain shuffle.
    group_by_length: bool = True
    # raydpo: one sequence per pair (prompt + chosen + rejected, with a mask that keeps rejected from
    # seeing chosen), so each prompt is computed once; used when truncation keeps every prompt whole.
    share_prompt: bool = True
    # --- data (raydpo extras; README "Data formats") ---
    # Skip rows that can't be trained on (malformed, or a prompt that fills max_length under
    # keep_start) with a warning that counts them, instead of raising on the first one.
    skip_bad_rows: bool = False
    # Cache tokenized datasets in this local folder, keyed by source data, tokenizer and map_fn.
    dataset_cache_dir: Optional[str] = None
    # --- end data ---
    # from_pretrained's keyword arguments (also as JSON text). "dtype" (or transformers 4's "torch_dtype") may
    # name a torch dtype, e.g. "bfloat16", or be "auto"; the default is float32.
    model_init_kwargs: Optional[Union[dict, str]] = None
    # Mixture-of-Experts models (TRL's field and rule): the weight of the router's load-balancing loss
    # added to the DPO loss, and logged as aux_loss. None: the model config's own router_aux_loss_coef
    # (e.g. Mixtral's 0.001); 0.0 turns it off. Only for a model whose config has output_router_logits;
    # setting it for another model is an error. With it, batches use the two-sequence layout.
    router_aux_loss_coef: Optional[float] = None
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # Reference-model options of TRL. sync_ref_model (TR-DPO): every ref_model_sync_steps the in-worker
    # reference becomes alpha * policy + (1 - alpha) * reference.
    precompute_ref_log_probs: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # --- reference modes (raydpo extras; README "Reference modes") ---
    # precompute_ref_log_probs or stream_ref_log_probs: pairs per reference forward in the actors (None:
    # per_device_train_batch_size), the number of actors, and each actor's Ray resources (None:
    # {"GPU": 1} with use_gpu, else {"CPU": 1}).
    precompute_ref_batch_size: Optional[int] = None
    precompute_ref_num_actors: int = 1
    precompute_ref_resources: Optional[Union[dict, str]] = None
    # Precomputed log-probs are cached here, keyed by (reference model, tokenized rows, settings), so a
    # second run and every sweep trial skip the reference forward. None turns the cache off.
    precompute_ref_cache_dir: Optional[str] = "~/.cache/raydpo/ref_logps"
    # Streamed: the same actor pool computes the reference log-probs while training runs, each worker
    # sending its micro-batches stream_ref_prefetch_batches ahead of the one it trains on. A cached
    # precompute for the same rows is used instead when there is one.
    stream_ref_log_probs: bool = False
    stream_ref_prefetch_batches: int = 2
    # --- end reference modes ---

    # --- Ray and DeepSpeed ---
    num_workers: int = 1
    use_gpu: bool = False
    # Resources of one training worker, e.g. {"CPU": 0.5}. None sizes it from the cluster so that
    # N workers fit beside Ray Data's tasks on a small machine.
    resources_per_worker: Optional[Union[dict, str]] = None
    # A DeepSpeed config: a dict or a path to a JSON file. None uses raydpo's default; "auto" values
    # and missing batch / accumulation / clipping / optimizer fields are filled from this config.
    deepspeed: Optional[Union[dict, str]] = None
    # ZeRO stage used when the DeepSpeed config does not set one. None: 0 for a single worker (nothing
    # to shard, and ZeRO's gradient bucketing costs ~25% of a CPU step), 2 for several.
    zero_stage: Optional[int] = None
    # Where Ray Train persists checkpoints (local path or URI). None: output_dir.
    storage_path: Optional[str] = None
    # Ray cluster to join. None: RAY_ADDRESS if set, else an embedded local Ray.
    ray_address: Optional[str] = None
    # Threads each worker's torch uses; None divides the node's cores among the workers.
    torch_threads_per_worker: Optional[int] = None

    # --- reliability ---
    # Ray Train restarts the worker group from the latest checkpoint up to this many times (-1: forever).
    max_failures: int = 0
    # Keep only the newest K checkpoints (None keeps all).
    save_total_limit: Optional[int] = None
    # Remote code in a model repo runs only when the user asks for it.
    trust_remote_code: bool = False

    # --- accepted for TRL configs, with no effect (README "CLI") ---
    # TRL's DPOTrainer keeps the columns DPO reads (prompt, chosen, rejected, images, tools) whatever this
    # says, and raydpo reads only those: neither value changes a run.
    remove_unused_columns: bool = True

    def __post_init__(self):
        self._parse_json_fields()
        if isinstance(self.loss_type, (list, tuple)) and len(self.loss_type) == 1:
            self.loss_type = self.loss_type[0]

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"DPOConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_workers"):
            positive(name)
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

    def _parse_json_fields(self):
        """Dict fields given as JSON text (a command-line flag), as transformers' TrainingArguments takes them;
        deepspeed's text is a file path unless it starts with "{"."""
        for name in ("lr_scheduler_kwargs", "model_init_kwargs", "resources_per_worker", "precompute_ref_resources",
                     "deepspeed"):
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


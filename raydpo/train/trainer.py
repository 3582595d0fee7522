"""DPOTrainer: the TRL-shaped facade. It prepares data on the driver and hands the loop to Ray Train."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raydpo import cluster, hub, storage
from raydpo.config import DPOConfig
from raydpo.data.images import text_tokenizer
from raydpo.data.tokenize import prepare_dataset
from raydpo.data.shards import contiguous_shards
from raydpo.train.backend import TorchBackendConfig
from raydpo.train.callbacks import CallbackHandler
from raydpo.train.checkpoint import MODEL_DIR
from raydpo.train.deepspeed import check_lr_scheduler
from raydpo.train.loop import train_in_process, train_loop_per_worker
from raydpo.train.model_objects import is_model_object, model_name, objects_folder, save_model_object
from raydpo.train.history import discard_history, open_history
from raydpo.train.progress import EventPump, ProgressPrinter
from raydpo.train.run_context import CheckpointKeeper
from raydpo.train.startup import startup_seconds
from raydpo.train.spec import WorkerSpec, training_plan
from raydpo.train.trackers import check_trackers_storage, report_targets
from raydpo.placement_group_cleaner import SessionCleanerCallback, session_cleaner
from raydpo.model_loading import adapter_base, is_adapter_dir, reference_model_path
from raydpo.reference.precompute import needs_precompute
from raydpo.reference.streamed import close_reference_pool, open_reference_pool


@dataclass
class TrainOutput:
    metrics: dict  # the last logged metrics
    history: List[dict] = field(default_factory=list)  # one dict per logging step, in order
    checkpoint: Optional[str] = None  # path of the latest checkpoint
    # seconds from fit() to the end of the first optimizer step, by phase (raydpo.train.startup)
    startup: dict = field(default_factory=dict)


def export_model(checkpoint: str, output_dir: str) -> str:
    """Copy a checkpoint's plain transformers folder (policy + tokenizer) to output_dir; either may be a
    local path or a URI (storage.py)."""
    if not (storage.is_uri(checkpoint) or storage.is_uri(output_dir)):
        shutil.copytree(os.path.join(checkpoint, MODEL_DIR), output_dir, dirs_exist_ok=True)
        return output_dir
    return storage.copy_dir(storage.join(checkpoint, MODEL_DIR), storage.absolute(output_dir))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's processing class, as TRL loads it: AutoProcessor gives a vision-language model's
    processor (tokenizer and image processor) and a text model's tokenizer."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def _load_model_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer; for an adapter folder saved without one, its base model's."""
    try:
        return load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError):
        if not is_adapter_dir(path):
            raise
        return load_tokenizer(adapter_base(path), trust_remote_code)


def with_reference_logps(data, config: DPOConfig, model: str, ref_model: Optional[str], tokenizer):
    """TokenizedData with the reference columns added by the actor pool (or found in the cache)."""
    from raydpo.reference.precompute import precompute_ref_logps

    return dataclasses.replace(data, dataset=precompute_ref_logps(
        data.dataset, reference_model_path(model, ref_model), config, text_tokenizer(tokenizer).pad_token_id))


def with_cached_reference_logps(data, config: DPOConfig, model: str, ref_model: Optional[str]):
    """Streamed mode: rows a precompute already cached carry their columns, and the pool skips them."""
    from raydpo.reference.precompute import cached_ref_logps

    cached = cached_ref_logps(data.dataset, reference_model_path(model, ref_model), config)
    return dataclasses.replace(data, dataset=cached) if cached is not None else data


def fit(config: DPOConfig, model: str, ref_model: str, tokenizer, train_data, resume_from_checkpoint=None,
        callbacks=(), peft_config=None, eval_data=None, handler: Optional[CallbackHandler] = None) -> TrainOutput:
    """One Ray Train run over already tokenized data. DPOTrainer.train() and each sweep trial call this.

    ref_model=None with PEFT: the reference is the base with adapters disabled (peft_config), or a
    frozen copy of the adapter being continued (an adapter folder as model), as in TRL.
    precompute_ref_log_probs: an actor pool adds the reference columns first (to the eval split too);
    stream_ref_log_probs: the pool scores them beside the training workers.
    With load_best_model_at_end the returned checkpoint is the best one. `callbacks` are Ray Train's;
    `handler` delivers the run's events to transformers TrainerCallbacks on the driver (callbacks.py)."""
    fit_start = time.time()
    if config.num_workers == 0 and callbacks:  # before any actor starts, so nothing is left behind
        raise ValueError("Ray Train callbacks need workers: with num_workers=0 (local mode) no Ray Train run "
                         "calls them; set num_workers >= 1")
    config = cluster.resolve_use_gpu(config)
    # Before any actor or worker starts: a request the cluster cannot hold would wait forever; refused here.
    resources = cluster.sizes(config)
    if isinstance(config.deepspeed, str):  # a JSON path exists on the driver only: the workers get its contents
        config = dataclasses.replace(config, deepspeed=config.deepspeed_dict())
    plan = training_plan(train_data.num_rows, config, eval_data.num_rows if eval_data is not None else 0)
    check_lr_scheduler(config, plan.total_steps)  # a bad lr_scheduler_kwargs fails here, not in a worker
    datasets = {"train": train_data, "eval": eval_data} if eval_data is not None else {"train": train_data}
    if config.precompute_ref_log_probs:
        datasets = {name: with_reference_logps(data, config, model, ref_model, tokenizer)
                    for name, data in datasets.items()}
    reference_pool = None
    if config.stream_ref_log_probs:
        datasets = {name: with_cached_reference_logps(data, config, model, ref_model)
                    for name, data in datasets.items()}
        if any(needs_precompute(data.dataset) for data in datasets.values()):
            reference_pool = open_reference_pool(reference_model_path(model, ref_model), config,
                                                 text_tokenizer(tokenizer).pad_token_id, resources.actor)
    best_metric, best_mode = config.best_metric if config.load_best_model_at_end else (None, "max")
    run_name = config.run_name or time.strftime("raydpo-%Y%m%d-%H%M%S")
    storage_path = storage.absolute(config.storage_path or config.output_dir)
    check_trackers_storage(config.report_to, storage_path)
    tracked_config = {k: v for k, v in config.to_dict().items() if k != "hub_token"}  # a secret stays out
    history = open_history(report_targets(config.report_to), storage.join(storage_path, run_name), run_name,
                           tracked_config)
    try:
        spec = WorkerSpec(
            config=config.to_dict(), plan=plan, model=model, ref_model=ref_model, tokenizer=tokenizer,
            pad_token_id=text_tokenizer(tokenizer).pad_token_id, history=history, peft_config=peft_config,
            shards={name: contiguous_shards(data.dataset, config.world_size) for name, data in datasets.items()},
            resume_from_checkpoint=resume_from_checkpoint, reference_pool=reference_pool,
            driver_events=handler is not None,  # rank 0 also sends ("save", step) events
            wait_for_driver=handler is not None and handler.waits)  # workers honour should_training_stop
        if config.num_workers == 0:  # local mode: the loop in this process, as Ray Train's num_workers=0
            run = _local_run(spec, config, storage.join(storage_path, run_name), best_metric, best_mode)
        else:
            run = _ray_train_run(spec, config, resources, run_name, storage_path, best_metric, best_mode, callbacks)
        cluster.quiet_logs(config.log_level)
        if handler is not None:
            handler.train_begin(plan, storage.join(storage_path, run_name))
        # One driver thread follows the run: the progress lines and, with callbacks, their events and acks
        # (polled more often then, since workers wait on each ack).
        pump = EventPump(lambda count: ray.get(history.events_since.remote(count)), ProgressPrinter(plan.total_steps),
                         handler, lambda step, stop: ray.get(history.ack.remote(step, stop)),
                         interval_s=1.0 if handler is None else 0.1)
        with pump:  # delivers the last events after fit(); a callback's error is raised here
            final = run()
    except BaseException:  # a shared history would otherwise stay open in the session (history.py)
        discard_history(history)
        raise
    finally:
        close_reference_pool(reference_pool)
    marks, rows = ray.get([history.startup_marks.remote(), history.close.remote()])  # close ends a shared history
    return TrainOutput(metrics=rows[-1] if rows else {}, history=rows, checkpoint=final,
                       startup=startup_seconds(fit_start, marks))


def _local_run(spec: WorkerSpec, config: DPOConfig, run_dir: str, best_metric: Optional[str], best_mode: str):
    """Local mode's counterpart of _ray_train_run: the loop in this process (loop.train_in_process), its
    checkpoints kept in run_dir by Ray Train's rule (run_context.CheckpointKeeper)."""
    keeper = CheckpointKeeper(config.save_total_limit, best_metric, best_mode)

    def run() -> Optional[str]:
        train_in_process(spec, run_dir, keeper)
        return keeper.best(best_metric, best_mode) if best_metric else keeper.latest

    return run


class RunTrainer(TorchTrainer):
    """TorchTrainer without Ray Train's DatasetsCallback when the run is given no `datasets`, and with
    the session's placement-group cleaner instead of a new one per run (`cleaner`, when given).

    Ray 2.60's callback starts a DatasetManager actor for every run (ray-project/ray#63309 made it an
    actor that holds the run's datasets and splits them on request), with `datasets` empty too: a new
    process importing Ray Train and Ray Data (~2.5 s of CPU) that raydpo never asks for a shard, since each
    worker's shard travels in its spec (data/shards.py). The callback's other work, copying the driver's
    Ray Data context to the workers, serves `ray.train.get_dataset_shard`, which the loop never calls.
    tests/test_startup.py checks which callbacks remain, tests/test_many_runs.py that no run starts a
    DatasetManager.

    It also gives the driver back its Ctrl-C handler when the run ends (cluster.signal_handlers_kept).
    Ray 2.60's fit() installs a SIGINT handler that aborts the run (DataParallelTrainer.
    _register_sigint_handler) and never removes it: after the run, Ctrl-C in the driver (a notebook, a
    script looping over configs) only logs "aborting" to the finished run, twice, and the third exits the
    process; and the handler's closure holds the finished run's controller, so that actor (torch
    imported) and what it holds, the run's MetricsHistory, stay alive until the next run replaces the
    handler. tests/test_many_runs.py checks both after every run."""

    def __init__(self, *args, cleaner=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._cleaner = cleaner  # the session's placement-group cleaner (placement_group_cleaner.py), or None

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self._cleaner is not None:  # the session's cleaner instead of a new one for this run
            callbacks = [SessionCleanerCallback(self._cleaner) if isinstance(c, PlacementGroupCleanerCallback) else c
                         for c in callbacks]
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        with cluster.signal_handlers_kept():
            return super()._initialize_and_run_controller(**controller_init_kwargs)


def _ray_train_run(spec: WorkerSpec, config: DPOConfig, resources, run_name: str, storage_path: str,
                   best_metric: Optional[str], best_mode: str, callbacks):
    """A function that runs `spec` with Ray Train's TorchTrainer and returns the path (or URI) of its final
    checkpoint: the best one by `best_metric`, else the latest; None when none was saved."""
    trainer = RunTrainer(  # TorchTrainer without a DatasetManager actor, or a cleaner actor, per run
        train_loop_per_worker,
        cleaner=session_cleaner(),
        torch_config=TorchBackendConfig(),  # TorchConfig's settings, without torch in the controller's start
        # A reference, not the spec: Ray Train's controller unpickles train_loop_config with its run context,
        # and the spec would import torch and transformers there (~1.7 s of the controller's start, before it
        # asks for the workers). Each worker gets it from the object store (loop.train_loop_per_worker).
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker=resources.worker),
        run_config=ray.train.RunConfig(
            name=run_name,
            # a URI's filesystem resolved here, with the options of its query string (storage.py)
            storage_path=storage.resolve(storage_path)[1] if storage.is_uri(storage_path) else storage_path,
            storage_filesystem=storage.resolve(storage_path)[0] if storage.is_uri(storage_path) else None,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # ranked by the eval metric with load_best_model_at_end, so save_total_limit keeps the best
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.save_total_limit,
                                                         checkpoint_score_attribute=best_metric,
                                                         checkpoint_score_order=best_mode),
            callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level=cluster.ray_log_level(config.log_level)),
            worker_runtime_env={"env_vars": cluster.cpu_process_env()} if not config.use_gpu else None),
        # no `datasets`: each worker's shard is in the spec (data/shards.py)
    )
    cluster.set_train_poll_interval(config.num_workers)  # how often the controller asks the workers (see there)
    # The loop never asks for preemption notices (ray.train.get_preemption_info); a worker lost to a
    # preempted node is restarted by max_failures. The watcher would be one more actor per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

    def run() -> Optional[str]:
        result = trainer.fit()
        final = result.get_best_checkpoint(best_metric, best_mode) if best_metric else result.checkpoint
        return storage.to_uri(storage_path, final.path) if final else None

    return run


def _check_router_aux_loss(model: str, config: DPOConfig):
    from transformers import AutoConfig

    from raydpo.losses import router_aux_loss_coef

    path = adapter_base(model) if is_adapter_dir(model) else model
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    router_aux_loss_coef(model_config.get_text_config(), config.router_aux_loss_coef)


class DPOTrainer:
    """`DPOTrainer(model, ref_model, args, train_dataset, processing_class).train()`, run on Ray.

    model / ref_model: a local path or model id (what from_pretrained takes), or a PreTrainedModel /
    PeftModel object, saved once and handed on as a path (model_objects.py). ref_model=None uses a
    frozen copy of the initial policy. callbacks: transformers TrainerCallbacks, run on the driver.
    quantization_config: TRL's keyword, accepted as None only (quantized base models are not trained).
    The data is tokenized and checked here, before any training worker starts: a bad row raises a
    ValueError naming its index and field.
    """

    def __init__(self, model: Any, ref_model: Any = None, args: Optional[DPOConfig] = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class=None,
                 resume_from_checkpoint: Optional[str] = None, peft_config=None, callbacks: Optional[list] = None,
                 quantization_config=None):
        if quantization_config is not None:  # TRL's script passes get_quantization_config(model_args): None unless asked
            raise ValueError("quantization_config: raydpo does not train quantized (bitsandbytes 4/8-bit) base models; "
                             "pass quantization_config=None (drop load_in_4bit / load_in_8bit)")
        for name, value in (("model", model), ("ref_model", ref_model)):
            if not (value is None and name == "ref_model" or isinstance(value, (str, os.PathLike))
                    or is_model_object(value)):
                raise TypeError(f"{name} must be a local path or model id (what from_pretrained takes), a "
                                f"transformers.PreTrainedModel or a peft.PeftModel; got {type(value).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self.args = args or DPOConfig()
        if isinstance(self.args.deepspeed, str):  # read here, as the data: the path is on the driver only
            self.args = dataclasses.replace(self.args, deepspeed=self.args.deepspeed_dict())
        # The base model's name for the tokenizer and the model card: a model object's own (what it was
        # loaded from); a path's is the path itself (or an adapter folder's base).
        model_object = is_model_object(model)
        self.model_name = model_name(model) if model_object else None
        model, ref_model = self._ship_model_objects(model, ref_model)
        self.model = os.fspath(model)
        # PEFT (peft_config, or a saved adapter folder as model): a new adapter, or that one continued
        self.peft_config = peft_config
        peft = peft_config is not None or is_adapter_dir(self.model)
        if peft and self.args.sync_ref_model:  # as TRL: the reference lives inside the PEFT model
            raise ValueError("sync_ref_model (TR-DPO) cannot be combined with PEFT: the reference is inside the "
                             "policy (its base, or a frozen copy of a continued adapter), so there is no separate "
                             "reference to update")
        if self.args.router_aux_loss_coef:  # as TRL, a coefficient for a model that is not MoE fails, here at once
            _check_router_aux_loss(self.model, self.args)
        if peft_config is not None and is_adapter_dir(self.model):
            raise ValueError(f"model {self.model!r} is a PEFT adapter folder, which training continues; "
                             "pass peft_config=None (or the base model to start a new adapter)")
        # ref_model=None: a frozen copy of the initial policy; with PEFT, inside the policy (the base with adapters
        # disabled, or a continued adapter's frozen "ref" copy)
        self.ref_model = os.fspath(ref_model) if ref_model is not None else (None if peft else self.model)
        if processing_class is None and model_object:  # as TRL: the tokenizer of what the object was loaded from
            if self.model_name is None:
                raise ValueError("model is a model object that records no name or path to load its tokenizer "
                                 "from: pass processing_class")
            processing_class = load_tokenizer(self.model_name, self.args.trust_remote_code)
        self.processing_class = processing_class or _load_model_tokenizer(self.model, self.args.trust_remote_code)
        tokenizer = text_tokenizer(self.processing_class)  # a processor's own tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as TRL does
        self.resume_from_checkpoint = _checkpoint_folder(resume_from_checkpoint)
        self.state: Optional[TrainOutput] = None
        # transformers TrainerCallbacks, run on the driver (callbacks.py); with hub_strategy="every_save"
        # the handler also pushes each saved checkpoint
        self.callback_handler = CallbackHandler(callbacks, self.args, self.processing_class,
                                                on_save_hook=self._push_checkpoint)
        self.train_dataset_description = hub.describe_dataset(train_dataset)  # for push_to_hub's card

        cluster.connect(self.args.ray_address)
        self.args = cluster.resolve_use_gpu(self.args)  # use_gpu=None: GPUs if the cluster has them
        cluster.quiet_logs(self.args.log_level)
        self.train_data = prepare_dataset(train_dataset, self.processing_class, self.args)
        self.eval_data = (prepare_dataset(eval_dataset, self.processing_class, self.args, split_name="eval_dataset")
                          if eval_dataset is not None else None)
        for name, data in (("train_dataset", self.train_data), ("eval_dataset", self.eval_data)):
            if data is not None and data.num_rows < self.args.num_workers:
                raise ValueError(f"{name} has {data.num_rows} rows, fewer than num_workers={self.args.num_workers}: "
                                 "every worker needs at least one pair")
        vision = any(data is not None and data.vision for data in (self.train_data, self.eval_data))
        if vision and self.args.padding_free:
            raise ValueError("padding_free is not supported for rows with images: their pixel inputs need the padded "
                             "layout; set padding_free=False")
        if vision and (self.args.precompute_ref_log_probs or self.args.stream_ref_log_probs):
            raise ValueError("precompute_ref_log_probs and stream_ref_log_probs are not supported for rows with images "
                             "(as in TRL): the reference actors score text batches only; use the in-worker reference")
        if self.eval_data is None and (self.args.load_best_model_at_end or self.args.early_stopping_patience
                                       or self.args.save_strategy == "best"):
            raise ValueError("load_best_model_at_end, early_stopping_patience and save_strategy='best' need an "
                             "eval_dataset")

    def _ship_model_objects(self, model, ref_model) -> tuple:
        """A model object is saved once (save_pretrained) into a folder under the run's storage, and the
        workers load that folder like any path; the trainer keeps no reference to the object."""
        if not (is_model_object(model) or is_model_object(ref_model)):
            return model, ref_model
        location = self.args.storage_path or self.args.output_dir
        if storage.is_uri(location):
            cluster.connect(self.args.ray_address)
            nodes = sum(node["Alive"] for node in ray.nodes())
            if nodes > 1:  # the object's folder would be on the driver's disk only
                raise ValueError(f"model / ref_model: a model object is saved to a folder the workers load, and with "
                                 f"storage_path a URI ({location!r}) on a {nodes}-node cluster that folder is on the "
                                 "driver only: pass the model's hub id or a path every node reads (save_pretrained "
                                 "it to shared storage), or set storage_path to a shared mount")
        folder = objects_folder(location)
        if is_model_object(model):
            model = save_model_object(model, os.path.join(folder, "model"), "model")
        if is_model_object(ref_model):
            ref_model = save_model_object(ref_model, os.path.join(folder, "ref_model"), "ref_model")
        return model, ref_model

    def train(self, resume_from_checkpoint: Optional[str] = None) -> TrainOutput:
        """One Ray Train run. resume_from_checkpoint (a checkpoint folder) overrides the constructor's, as
        transformers' Trainer.train(resume_from_checkpoint=...) is called by TRL's scripts. TrainerCallbacks
        get their events live; with push_to_hub the trained model is uploaded at the end (and with
        hub_strategy="every_save" each checkpoint as it is saved)."""
        if resume_from_checkpoint is not None:
            self.resume_from_checkpoint = _checkpoint_folder(resume_from_checkpoint)
        handler = self.callback_handler
        every_save = self.args.push_to_hub and self.args.hub_strategy == "every_save"
        self.state = fit(self.args, self.model, self.ref_model, self.processing_class, self.train_data,
                         resume_from_checkpoint=storage.absolute(self.resume_from_checkpoint), peft_config=self.peft_config,
                         eval_data=self.eval_data, handler=handler if handler.callbacks or every_save else None)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="End of training")
        handler.train_end()
        return self.state

    def _push_checkpoint(self, step: int, checkpoint_path: str, logs: dict):
        """hub_strategy="every_save": upload a checkpoint's model as soon as it is saved (on the driver)."""
        if not (self.args.push_to_hub and self.args.hub_strategy == "every_save"):
            return
        with storage.local_dir(storage.join(checkpoint_path, MODEL_DIR)) as folder:
            self._push(folder, logs, f"Training in progress, step {step}")

    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict:
        """DPO metrics of the policy on the eval set (the constructor's, or `eval_dataset`), named as TRL
        names them (eval_loss, eval_rewards/chosen, ...). The policy is the trained one after train() (the
        checkpoint train() returned: the best one with load_best_model_at_end), else the initial one.

        It runs in this process (the driver), on one GPU with use_gpu (when the driver has one), else on
        the CPU, with the training loop's own batch, loss and metric code (`step.evaluate`), so it needs the
        memory of the policy and the reference. Callbacks get on_log and on_evaluate."""
        from raydpo.train.driver_eval import evaluate_policy

        if eval_dataset is not None:
            data = prepare_dataset(eval_dataset, self.processing_class, self.args, split_name="eval_dataset")
        elif self.eval_data is not None:
            data = self.eval_data
        else:
            raise ValueError("evaluate needs an eval_dataset: pass one here or to DPOTrainer(eval_dataset=...)")
        checkpoint = self.state.checkpoint if self.state is not None else None
        with storage.local_dir(checkpoint) if checkpoint else contextlib.nullcontext() as checkpoint_dir:
            metrics = evaluate_policy(self.args, self.model, self.ref_model, self.peft_config, self.processing_class,
                                      data, checkpoint_dir)
        metrics = {f"{metric_key_prefix}_{name[len('eval_'):]}": value for name, value in metrics.items()}
        handler = self.callback_handler
        if self.state is not None and self.state.history:
            metrics["epoch"] = self.state.history[-1].get("epoch")
            handler.state.epoch = metrics["epoch"]
        handler.state.log_history.append({**metrics, "step": handler.state.global_step})
        handler.call("on_log", logs=metrics)
        handler.call("on_evaluate", metrics=metrics)
        return metrics

    def save_model(self, output_dir: Optional[str] = None) -> str:
        """Copy the trained policy (a plain transformers folder, with the tokenizer) to output_dir. With
        PEFT it is the adapter folder (with the tokenizer) that `PeftModel.from_pretrained(base, dir)` loads."""
        if self.state is None or self.state.checkpoint is None:
            raise RuntimeError("save_model needs a finished train() with a checkpoint (save_strategy='no' saves none)")
        output_dir = output_dir or self.args.output_dir
        return export_model(self.state.checkpoint, output_dir)

    def push_to_hub(self, repo_id: Optional[str] = None, token: Optional[str] = None, private: Optional[bool] = None,
                    commit_message: str = "Upload DPO model trained with raydpo",
                    dataset_name: Optional[str] = None) -> str:
        """Upload what save_model writes (the trained checkpoint's model/ folder) to the Hugging Face Hub,
        with a model card naming the base model, the training data, the DPO config and the final metrics.
        Returns the repo URL. The endpoint is huggingface_hub's (HF_ENDPOINT), the token its own when none
        is given.

        As transformers' Trainer.push_to_hub (TRL's scripts call it without a repo): repo_id, token and
        private default to DPOConfig's hub_model_id (else the output_dir's folder name: `hub_model_id`),
        hub_token and hub_private_repo; dataset_name (TRL's keyword) names the training data on the card."""
        if self.state is None or self.state.checkpoint is None:
            raise RuntimeError("push_to_hub needs a finished train() with a checkpoint: call trainer.train() first")
        with storage.local_dir(storage.join(self.state.checkpoint, MODEL_DIR)) as folder:
            return self._push(folder, self.state.metrics, commit_message, repo_id, token, private, dataset_name)

    def _push(self, folder: str, metrics: dict, commit_message: str, repo_id: Optional[str] = None,
              token: Optional[str] = None, private: Optional[bool] = None, dataset_name: Optional[str] = None) -> str:
        repo_id = repo_id or self.hub_model_id
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        base_model = getattr(self, "model_name", None) or (
            adapter_base(self.model) if is_adapter_dir(self.model) else self.model)
        data = dataset_name or self.train_dataset_description
        card = {"base_model": base_model, "training_data": f"{data}; {self.train_data.num_rows} pairs trained on",
                "dpo_config": self.args, "metrics": metrics}
        return hub.push_to_hub(folder, repo_id, model_card=card, token=token, private=private,
                               commit_message=commit_message)

    @property
    def hub_model_id(self) -> str:
        """The repo push_to_hub uses without a repo_id (transformers' rule): args.hub_model_id, else the
        output_dir's folder name."""
        return self.args.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(self.args.output_dir)))

    @property
    def accelerator(self) -> "DriverAccelerator":
        """For scripts written against TRL's trainer (`trainer.accelerator.print(...)`): the driver is the
        only process a raydpo script runs in, so it is the main process and prints."""
        return DriverAccelerator()

    def end(self) -> None:
        """transformers' Trainer.end() (TRL's scripts call it last): it finishes the trackers and the
        process group. In raydpo both live in the Ray workers and are finished when train() returns, so
        there is nothing left to close."""


class DriverAccelerator:
    """The part of accelerate's Accelerator that TRL's scripts use on the trainer, for the Ray driver."""

    is_main_process = True
    is_local_main_process = True
    process_index = 0
    num_processes = 1

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs)


def _checkpoint_folder(path) -> Optional[str]:
    if path is None:
        return None
    if isinstance(path, bool):  # transformers' True: the last checkpoint in output_dir
        raise ValueError("resume_from_checkpoint=True (the latest checkpoint in output_dir) is not supported: "
                         "checkpoints go to <output_dir or storage_path>/<run_name>/checkpoint-<step>, so pass "
                         "that folder")
    path = os.fspath(path)
    if not storage.is_dir(path):  # a local folder or a URI's (s3://bucket/run/checkpoint-500)
        raise ValueError(f"resume_from_checkpoint: no checkpoint folder at {path!r}")
    return path

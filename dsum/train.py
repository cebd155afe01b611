"""The training loop: data → model → HF Trainer → adapter (or full weights).

`fit` is what one worker runs. It reads its JobConfig, the data the driver prepared, and writes only
under the output directory it is given, and only the main process (rank 0) writes there; so the same
function serves a single process and each worker of a Ray Train group. Results come back as a
`TrainResult`, which the Ray layer carries to the driver.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dsum import data, rundir
from dsum import model as models
from dsum.config import JobConfig
from dsum.errors import DsumError
from dsum.steps import StepSink


class TrainError(DsumError):
    pass


@dataclasses.dataclass
class PreparedData:
    """The job's data, cleaned, split and tokenized once (by the driver, for every worker)."""

    tokenized: Any  # datasets.DatasetDict with train and validation
    splits: dict[str, dict[str, Any]]  # per split: source, rows, bad_rows, fingerprint
    dropped: dict[str, int]  # rows dropped at tokenization, per split
    # train.eval_rouge_samples: the validation rows generated at each evaluation (dialogue, references)
    rouge_rows: dict[str, list] | None = None
    # the cleaned rows of every split (datasets.DatasetDict): the run's evaluation reads its split from here,
    # so a run loads and splits its data once; the driver's alone (for_workers)
    rows: Any = None

    def for_workers(self) -> PreparedData:
        """What a training worker needs: the rows stay on the driver."""
        return dataclasses.replace(self, rows=None)


@dataclasses.dataclass
class TrainResult:
    """What training reports: it crosses from rank 0 to the driver as a plain dict (Ray's Result.metrics)."""

    global_step: int
    resumed_from_step: int
    train_loss: float | None
    eval_loss: float | None
    trainable_params: int
    total_params: int
    train_tokens_per_s: float | None
    train_rows: int
    rows_dropped_at_tokenization: dict[str, int]
    log_history: list[dict[str, Any]]
    eval_rougeL: float | None = None  # with train.eval_rouge_samples: at the final evaluation
    # when each part of start-up ended (time.time(), rank 0's clock): fit's own marks and its caller's
    startup: dict[str, float] = dataclasses.field(default_factory=dict)
    # where an optimizer step's time went, in mean milliseconds per step (rank 0's; _Throughput says the parts)
    step_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


STARTUP = (
    ("imports", "command", "imported"),  # the CLI, config, and the training stack (transformers, peft, torch)
    ("preflight", "imported", "preflight"),  # checks on a weightless model; the data loaded and tokenized
    ("ray", "preflight", "ray"),  # a local Ray started, or the cluster joined
    ("run_setup", "ray", "fit"),  # run directory, MLflow run, the data into Ray's object store
    ("worker_group", "fit", "train_fn"),  # Train controller, placement group, worker processes, torch.distributed
    ("worker_imports", "train_fn", "worker_imported"),  # the worker's training stack
    ("worker_data", "worker_imported", "data"),  # from the object store; the tokenizer loaded
    ("model", "data", "model"),  # the base model loaded, the method applied
    ("trainer", "model", "trainer"),  # transformers' Trainer and accelerate set up (DeepSpeed where used)
    ("first_step", "trainer", "first_step"),
)
"""Start-up of `dsum train`, from the command to its first optimizer step, in parts: (name, from, to) of the
marks the driver and rank 0 take (time.time(); on a cluster, the worker's clock for its parts). A sweep's
trial segment has the parts from "fit" on, "fit" being when the trial's function started it
(dsum.cluster.worker.log_startup)."""


def startup(marks: dict[str, float], since: str = "command") -> dict[str, float]:
    """Each part's seconds (those whose two marks were taken: a run resumed at its end takes no step), and
    total_s from the mark `since` (the command's start) to the first step."""
    parts = {f"{name}_s": round(marks[end] - marks[start], 3) for name, start, end in STARTUP
             if start in marks and end in marks}  # fmt: skip
    if since in marks and "first_step" in marks:
        parts["total_s"] = round(marks["first_step"] - marks[since], 3)
    return parts


def fit(
    job: JobConfig,
    output_dir: Path,
    prepared: PreparedData | None = None,
    resume_from: str | Path | None = None,
    callbacks=(),
    final_dir: Path | None = None,
    marks: dict[str, float] | None = None,
):
    """Train the job's model; returns (trained model, TrainResult).

    `marks` (name → time.time()) gets when start-up's parts end here: "data" (tokenizer and data at hand),
    "model" (built, the method applied), "trainer" (the Trainer set up), "first_step" (the first optimizer step
    taken); the result's `startup` holds them, with the caller's own.

    Checkpoints go to output_dir; resume_from is a Trainer checkpoint directory to start from (where one
    comes from is the Ray layer's: dsum.cluster.resume). With final_dir, rank 0 also publishes the final
    weights and tokenizer there (Ray Train runs leave them in the last checkpoint, which Ray keeps in its storage).
    """
    from transformers import set_seed

    set_seed(job.train.seed)
    checkpoint = str(resume_from) if resume_from is not None else None
    # read now: a checkpoint handed over by Ray may be rotated out of storage while training goes on
    resumed_from_step = check_checkpoint(Path(checkpoint)) if checkpoint else 0
    marks = {} if marks is None else marks
    tokenizer = models.load_tokenizer(job.model)
    prepared = prepared or prepare_data(job, tokenizer)
    marks["data"] = time.time()
    base = models.load_base(job.model, job.method, quant_storage=job.quant_storage)
    if job.method.bits and job.scaling.strategy == "deepspeed-zero3":
        models.keep_4bit_layout(base)
    model = models.apply_method(base, job.model.task, job.method, job.train.gradient_checkpointing)
    counts = models.parameter_counts(model)
    marks["model"] = time.time()

    trainer = _trainer(job, model, tokenizer, prepared.tokenized, output_dir, callbacks)
    speed = _Throughput()
    trainer.add_callback(speed)
    trainer.add_callback(_FirstStep(marks))
    if prepared.rouge_rows:
        trainer.add_callback(RougeAtEvaluation(job, tokenizer, prepared.rouge_rows, trainer))
    marks["trainer"] = time.time()
    if checkpoint and resumed_from_step >= _steps(job, trainer):
        # A finished run run again: the Trainer would take one more step past the end; load its state only.
        from transformers import TrainerState

        # Private, and the one such call: no public Trainer method loads a checkpoint's weights without training
        # (adapters, full weights, DeepSpeed shards alike). Checked with transformers 5.24; tests/test_train.py
        # (test_resume_continues_at_saved_step: a finished run run again keeps its weights) fails if it breaks.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        train_loss = sum(losses) / len(losses) if losses else None  # the mean of the logged losses
    else:
        train_loss = trainer.train(resume_from_checkpoint=checkpoint).training_loss
    eval_metrics = trainer.evaluate()

    outcome = TrainResult(
        **counts,
        train_loss=train_loss,
        eval_loss=eval_metrics.get("eval_loss"),
        eval_rougeL=eval_metrics.get(RougeAtEvaluation.KEY),
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_from_step,
        train_tokens_per_s=speed.tokens_per_s,
        train_rows=len(prepared.tokenized["train"]),
        rows_dropped_at_tokenization=prepared.dropped,
        log_history=trainer.state.log_history,
        startup=dict(marks),
        step_ms=speed.step_ms,
    )
    if final_dir is not None and trainer.is_world_process_zero():
        with rundir.staged(final_dir) as partial:
            trainer.save_model(str(partial))  # adapter only, for LoRA/QLoRA
            tokenizer.save_pretrained(partial)
    return trainer.model, outcome


class _FirstStep(TrainerCallback):
    """Marks the end of the first optimizer step this run takes (start-up's last part)."""

    def __init__(self, marks: dict[str, float]):
        self.marks = marks

    def on_step_end(self, args, state, control, **kw):
        self.marks.setdefault("first_step", time.time())


def _steps(job: JobConfig, trainer) -> int:
    """The optimizer steps the run takes, as the Trainer counts them (its loader is built only for epochs)."""
    t = job.train
    return t.max_steps or job.batches.optimizer_steps(None, t.epochs, len(trainer.get_train_dataloader()))


def prepare_data(job: JobConfig, tokenizer=None) -> PreparedData:
    """Load, clean, split and tokenize the job's data."""
    tokenizer = tokenizer or models.load_tokenizer(job.model)
    splits, reports = data.load_splits(job.data, job.model.task)
    tokenized, dropped = data.tokenize_splits(splits, tokenizer, job.data, job.model.task)
    rouge_rows = None
    if job.train.eval_rouge_samples:
        head = splits["validation"].select(range(min(job.train.eval_rouge_samples, len(splits["validation"]))))
        rouge_rows = {"dialogue": head["dialogue"], "references": head["references"]}
    return PreparedData(tokenized, {k: v.as_dict() for k, v in reports.items()}, dropped, rouge_rows, splits)


class RougeAtEvaluation(TrainerCallback):
    """train.eval_rouge_samples: at each evaluation, summaries generated (greedy, the job's eval settings)
    for a fixed head of the validation split, scored with ROUGE-L, logged as eval_rougeL at that step (the
    metric a sweep can stop trials on). Every rank generates, so ZeRO-3's sharded weights stay in step."""

    KEY = "eval_rougeL"

    def __init__(self, job: JobConfig, tokenizer, rows: dict[str, list], trainer):
        self.job, self.tokenizer, self.rows, self.trainer = job, tokenizer, rows, trainer

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        from dsum.eval import generate
        from dsum.eval import metrics as scores

        was_training = model.training
        predictions = generate.generate(
            model, self.tokenizer, self.rows["dialogue"], self.job.data, self.job.eval, self.job.model.task
        )
        model.train(was_training)
        value = scores.mean_scores(scores.rouge_scores(predictions, self.rows["references"]))["rougeL"]
        if metrics is not None:
            metrics[self.KEY] = value  # evaluate() returns this dict: the final TrainResult gets it
        self.trainer.log({self.KEY: value})  # log history (Ray's reports) and the step metrics


class StepMetrics(TrainerCallback):
    """Hands rank 0's step metrics (loss, learning rate, grad norm, tokens seen) to its sink as they are
    logged (an opened StepTarget: MLflow directly, or the Ray layer's relay to the driver)."""

    KEYS = (
        "loss",
        "learning_rate",
        "grad_norm",
        "eval_loss",
        "eval_rougeL",
        "num_input_tokens_seen",
        "train_tokens_per_second",
    )

    def __init__(self, sink: StepSink):
        self.sink = sink

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {k: float(v) for k, v in logs.items() if k in self.KEYS and isinstance(v, int | float)}
        if metrics:
            self.sink(state.global_step, metrics)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.sink.close()


def check_checkpoint(path: Path) -> int:
    """The step of a Trainer checkpoint directory, checked to be readable before anything loads: one cut
    short by a kill (no readable trainer_state.json, which the Trainer writes last) or without weights is
    one line naming it."""
    state = path / "trainer_state.json"
    try:
        step = int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(
            f"train.resume_from: {path} is not a readable checkpoint ({type(e).__name__}: {state.name})"
        ) from None
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise TrainError(f"train.resume_from: {path} (step {step}) holds no weights")
    return step


def _trainer(job: JobConfig, model, tokenizer, tokenized, output_dir: Path, callbacks):
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        DataCollatorWithPadding,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        Trainer,
    )

    args = _training_arguments(job, output_dir)
    task = job.model.task
    if task == "classification":
        collator = DataCollatorWithPadding(tokenizer)
    elif job.data.packing:
        # Padding-free packing: a batch becomes one row whose position_ids restart per example, so the
        # attention mask stays block-diagonal and examples don't see each other.
        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer, model=model if task == "seq2seq" else None, label_pad_token_id=-100
        )
    cls = _dsum_trainer(Seq2SeqTrainer if task == "seq2seq" else Trainer)
    args_cls = Seq2SeqTrainingArguments if task == "seq2seq" else None
    if args_cls:
        args = args_cls(**args.to_dict() | {"output_dir": args.output_dir})
    return cls(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        # causal LMs already divide their summed loss by the step's token count that the Trainer passes in
        compute_loss_func=None if task == "causal" else _step_mean_loss,
    )


def _step_mean_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy averaged over every label of the optimizer step (target tokens, or examples for a
    classifier), whatever the split into micro-batches, accumulation steps and workers.

    Encoder-decoder and classification heads return their own micro-batch mean and ignore the step's count,
    which the Trainer would then neither divide by the accumulation steps nor by the workers: their loss
    and gradients would grow with both.
    """
    import torch.nn.functional as F

    logits = outputs["logits"]
    labels = labels.to(logits.device)
    summed = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum().clamp(min=1)
    return summed / count


def _dsum_trainer(trainer_cls):
    """The trainer with train.seed setting batch_rebalance's data order too (HF builds that sampler with
    its fixed default seed, so every seed of a job would otherwise see the same batches), and two per-step
    costs of HF's loop paid only where their results are read: the tokens seen (HF gathers each step's count
    across the workers every step, 1.8 ms of a 260 ms step at 2 workers here) are counted on each worker and
    summed across them when logged or checkpointed; the FLOPs estimate counts the model's weights once, not
    at every step (0.8 ms). Both give HF's figures."""
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class DsumTrainer(trainer_cls):
        _tokens_here = 0  # tokens seen on this worker since they were last summed into the state
        _flops_per_token: int | None = None

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):
                sampler.seed = self.args.seed
            return sampler

        def _track_num_input_tokens(self, inputs):
            """HF's non-padding count (the attention mask's ones, else the ids that aren't padding), this
            worker's only."""
            mask = inputs.get("attention_mask")
            if mask is not None:
                self._tokens_here += int(mask.sum())
                return
            ids, pad = inputs["input_ids"], getattr(self.processing_class, "pad_token_id", None)
            self._tokens_here += int((ids != pad).sum()) if pad is not None else ids.numel()

        def _sum_tokens(self) -> None:
            """Adds every worker's tokens since the last sum to the state (a collective: every rank logs and
            checkpoints at the same points)."""
            here = torch.tensor(self._tokens_here, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.reduce(here, reduction="sum"))
            self._tokens_here = 0

        def log(self, logs, *args, **kwargs):
            self._sum_tokens()
            super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, model, trial):
            self._sum_tokens()  # (the checkpoint's trainer_state.json holds the count a resumed run goes on from)
            super()._save_checkpoint(model, trial)

        def floating_point_ops(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs:
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:  # HF's estimate for one token: 6 × the weights, embeddings left out
                self._flops_per_token = super().floating_point_ops({main: torch.empty(1)})
            return self._flops_per_token * inputs[main].numel()

    DsumTrainer.__name__ = DsumTrainer.__qualname__ = trainer_cls.__name__
    return DsumTrainer


def deepspeed_config(strategy: str) -> str | None:
    """The DeepSpeed config file of a strategy (kept in dsum/deepspeed/; "auto" values come from the job)."""
    if not strategy.startswith("deepspeed-"):
        return None
    return str(Path(__file__).parent / "deepspeed" / f"{strategy.removeprefix('deepspeed-')}.json")


def _training_arguments(job: JobConfig, output_dir: Path):
    from transformers import TrainingArguments

    t = job.train
    steps = {"max_steps": t.max_steps} if t.max_steps else {"num_train_epochs": t.epochs, "max_steps": -1}
    save = (
        {"save_strategy": "steps", "save_steps": t.save_steps}
        if t.save_steps
        else ({"save_strategy": "steps", "save_steps": t.max_steps} if t.max_steps else {"save_strategy": "epoch"})
    )
    evaluation = {"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "no"}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=job.eval.batch_size,
        gradient_accumulation_steps=job.batches.accumulation,
        train_sampling_strategy=t.sampler,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio or t.warmup_steps,  # a float below 1 is a ratio of all steps
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_total_limit=t.save_total_limit,
        use_cpu=not job.scaling.use_gpu,
        report_to=[],  # tracking is dsum's own (rank 0 only)
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        # decoder-only models use every parameter each step, so DDP's search for unused ones is wasted;
        # encoder-decoders with tied, separately trained embeddings do leave one unused (HF's default then)
        ddp_find_unused_parameters=False if job.model.task == "causal" else None,
        deepspeed=deepspeed_config(job.scaling.strategy),
        **steps,
        **save,
        **evaluation,
    )


class _Throughput(TrainerCallback):
    """Real (non-pad) training tokens per second, counted from the attention masks the model saw; and where an
    optimizer step's time goes (`step_ms`, mean milliseconds per step over the steps after the first, whose
    time is set-up: DDP's buckets, the allocator):
      forward     the model's forward passes (hooks on the model; every micro batch of the step)
      backward    the rest until the optimizer: backward passes, the gradients' all-reduce (DDP, ZeRO), the
                  Trainer's per-step token count across workers, gradient clipping
      optimizer   the optimizer's step, the schedule, zeroing the gradients
      between     from one step's end to the next's start: the next batch, logging, checkpoints, reports to
                  Ray, evaluations, every callback
    """

    PARTS = ("forward", "backward", "optimizer", "between")

    def __init__(self):
        self.start = None
        self.tokens_per_s = None
        self.step_ms: dict[str, float] = {}
        self._spent = dict.fromkeys(self.PARTS, 0.0)
        self._steps = 0  # steps summed in _spent
        self._clock: float | None = None  # when the current part began
        self._forward_began: float | None = None
        self._forward_s = 0.0
        self._hooks = []
        self._first_taken = False

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = time.perf_counter()
        if model is not None:
            self._hooks = [model.register_forward_pre_hook(self._forward_begins),
                           model.register_forward_hook(self._forward_ends)]  # fmt: skip

    def _forward_begins(self, module, inputs):
        self._forward_began = time.perf_counter()

    def _forward_ends(self, module, inputs, output):
        if self._forward_began is not None:  # (evaluations' forward passes happen between steps: not counted)
            self._forward_s += time.perf_counter() - self._forward_began
            self._forward_began = None

    def on_step_begin(self, args, state, control, **kw):
        now = time.perf_counter()
        if self._clock is not None and self._steps:  # the gap since the previous step ended
            self._spent["between"] += now - self._clock
        self._clock, self._forward_s = now, 0.0

    def on_pre_optimizer_step(self, args, state, control, **kw):
        now = time.perf_counter()
        self._until_optimizer = now - self._clock
        self._clock = now

    _until_optimizer = 0.0  # this step's time from its start to the optimizer

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if self._first_taken:  # (this run's first step is set-up: not counted)
            self._spent["forward"] += self._forward_s
            self._spent["backward"] += self._until_optimizer - self._forward_s
            self._spent["optimizer"] += now - self._clock
            self._steps += 1
        self._first_taken = True
        self._clock, self._forward_began = now, None

    def on_train_end(self, args, state, control, **kw):
        for hook in self._hooks:
            hook.remove()
        elapsed = time.perf_counter() - (self.start or time.perf_counter())
        seen = state.num_input_tokens_seen or 0
        self.tokens_per_s = seen / elapsed if seen and elapsed > 0 else None
        if self._steps:
            between_steps = max(1, self._steps - 1)  # gaps between the timed steps
            self.step_ms = {part: round(1000 * spent / (between_steps if part == "between" else self._steps), 2)
                            for part, spent in self._spent.items()}  # fmt: skip

"""The training loop: data → model → HF Trainer → adapter (or full weights) in the run directory.

`fit` is what one worker runs. It reads only its JobConfig and the run directory, and only the main
process (rank 0) writes files there, so the same function serves a single process and a worker group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from dsum import data
from dsum import model as models
from dsum.config import DsumError, JobConfig

CHECKPOINTS = "checkpoints"
FINAL = "final"
PREPARED = "prepared"


class TrainError(DsumError):
    pass


def fit(job: JobConfig, run_dir: Path, resume_from: str | None = None, callbacks=(), save_final: bool = True):
    """Train the job's model; returns (trained model, metrics). Files go under run_dir.

    save_final=False leaves the result in the last checkpoint only (Ray Train keeps it in storage).
    """
    from transformers import set_seed

    set_seed(job.train.seed)
    checkpoint = resolve_checkpoint(resume_from, run_dir)
    # read now: a checkpoint handed over by Ray may be rotated out of storage while training goes on
    resumed_from_step = _checkpoint_step(Path(checkpoint)) if checkpoint else 0
    tokenizer = models.load_tokenizer(job.model)
    prepared = run_dir / PREPARED
    if (prepared / "data.json").exists():  # the driver tokenized once for every worker
        from datasets import DatasetDict

        tokenized = DatasetDict.load_from_disk(str(prepared / "tokenized"))
        info = json.loads((prepared / "data.json").read_text())
        splits_info, dropped = info["splits"], info["dropped"]
    else:
        tokenized, splits_info, dropped = prepare_data(job, tokenizer)
    base = models.load_base(job.model, job.method)
    model = models.apply_method(base, job.model.task, job.method, job.train.gradient_checkpointing)
    counts = models.parameter_counts(model)

    trainer = _trainer(job, model, tokenizer, tokenized, run_dir, callbacks)
    speed = _Throughput()
    trainer.add_callback(speed)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()

    metrics = {
        **counts,
        "train_loss": result.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from_step,
        "train_tokens_per_s": speed.tokens_per_s,
        "train_rows": len(tokenized["train"]),
        "rows_dropped_at_tokenization": dropped,
        "splits": splits_info,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        if save_final:
            # Written aside and renamed, so final/ is either complete or absent.
            partial = run_dir / f".{FINAL}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            trainer.save_model(str(partial))  # adapter only, for LoRA/QLoRA
            tokenizer.save_pretrained(partial)
            publish(partial, run_dir / FINAL)
        (run_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return trainer.model, metrics


def prepare_data(job: JobConfig, tokenizer):
    """Load, clean, split and tokenize: (tokenized train/validation, split reports, rows dropped)."""
    splits, reports = data.load_splits(job.data, job.model.task)
    tokenized, dropped = data.tokenize_splits(splits, tokenizer, job.data, job.model.task)
    return tokenized, {k: v.as_dict() for k, v in reports.items()}, dropped


def save_prepared(job: JobConfig, run_dir: Path) -> dict:
    """Tokenize once on the driver into run_dir/prepared, where every worker reads it."""
    tokenizer = models.load_tokenizer(job.model)
    tokenized, splits_info, dropped = prepare_data(job, tokenizer)
    partial = run_dir / f".{PREPARED}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenized.save_to_disk(str(partial / "tokenized"))
    (partial / "data.json").write_text(json.dumps({"splits": splits_info, "dropped": dropped}, indent=2))
    publish(partial, run_dir / PREPARED)
    return splits_info


def publish(src: Path, dest: Path) -> None:
    """Move a finished directory into place in one rename (replacing an older one)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(src, dest)


def resolve_checkpoint(resume_from: str | None, run_dir: Path) -> str | None:
    """A Trainer checkpoint directory to resume from, checked to be readable before anything loads.

    'latest' is the newest complete checkpoint of this run: one cut short by a kill (no readable
    trainer_state.json, which the Trainer writes last) is passed over.
    """
    if resume_from is None:
        return None
    if resume_from != "latest":
        return str(_check_checkpoint(Path(resume_from)))
    found = sorted((run_dir / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for path in reversed(found):
        try:
            return str(_check_checkpoint(path))
        except TrainError as e:
            print(f"dsum: skipping {e}", file=sys.stderr)
    return None  # nothing complete saved yet: start from step 0


def _checkpoint_step(path: Path) -> int:
    state = path / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(
            f"train.resume_from: {path} is not a readable checkpoint ({type(e).__name__}: {state.name})"
        ) from None


def _check_checkpoint(path: Path) -> Path:
    step = _checkpoint_step(path)
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise TrainError(f"train.resume_from: {path} (step {step}) holds no weights")
    return path


def _trainer(job: JobConfig, model, tokenizer, tokenized, run_dir: Path, callbacks):
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        DataCollatorWithPadding,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        Trainer,
    )

    args = _training_arguments(job, run_dir)
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
    cls = _seeded_data_order(Seq2SeqTrainer if task == "seq2seq" else Trainer)
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


def _seeded_data_order(trainer_cls):
    """The trainer with train.seed setting batch_rebalance's data order too (HF builds that sampler with
    its fixed default seed, so every seed of a job would otherwise see the same batches)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class SeededTrainer(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):
                sampler.seed = self.args.seed
            return sampler

    SeededTrainer.__name__ = SeededTrainer.__qualname__ = trainer_cls.__name__
    return SeededTrainer


def deepspeed_config(strategy: str) -> str | None:
    """The DeepSpeed config file of a strategy (kept in dsum/deepspeed/; "auto" values come from the job)."""
    if not strategy.startswith("deepspeed-"):
        return None
    return str(Path(__file__).parent / "deepspeed" / f"{strategy.removeprefix('deepspeed-')}.json")


def _training_arguments(job: JobConfig, run_dir: Path):
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
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=job.eval.batch_size,
        gradient_accumulation_steps=job.grad_accum_steps,
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
    """Real (non-pad) training tokens per second, counted from the attention masks the model saw."""

    def __init__(self):
        self.tokens = 0
        self.start = None
        self.tokens_per_s = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        elapsed = time.perf_counter() - (self.start or time.perf_counter())
        seen = state.num_input_tokens_seen or 0
        self.tokens_per_s = seen / elapsed if seen and elapsed > 0 else None


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs: the job and run directory arrive as a plain dict.

    A restarted worker group picks up the latest checkpoint Ray holds; every HF checkpoint is reported
    to Ray (which keeps it in the run's storage), and the final metrics are reported last.
    """
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from dsum.config import from_dict

    job = from_dict(config["job"], source=config["job_file"])
    if not job.scaling.use_gpu:  # a CPU worker computes on the cores Ray reserved for it, no more
        import torch

        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    resume = config.get("resume_from")
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt_dir:
        if ckpt_dir is not None:
            resume = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME)
        callbacks = [RayTrainReportCallback()]
        if config.get("tracking"):  # rank 0 logs step metrics to the driver's MLflow run
            from dsum.track import StepLogger

            callbacks.append(StepLogger(**config["tracking"]))
        _, metrics = fit(job, Path(config["run_dir"]), resume_from=resume, callbacks=callbacks, save_final=False)
    final = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    ray.train.report(final | {"dsum_done": 1})

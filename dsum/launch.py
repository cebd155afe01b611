"""Driver: run directory → train → evaluate base vs fine-tuned from what training saved → results.

Reads like the run it performs; each step is a function of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from dsum import data, evaluate, judge, report, track, train
from dsum import model as models
from dsum.config import DsumError, JobConfig


def run_job(job: JobConfig, job_file: str = "<job>", fresh: bool = False, address: str | None = None) -> dict[str, Any]:
    run_dir = prepare_run_dir(job, fresh)
    splits = preflight(job, run_dir)
    tracker = track.Tracker.open(job, run_dir, splits)  # an unreachable store stops us here, before training
    try:
        train_on_ray(job, run_dir, job_file, fresh, address, tracker)
        train_metrics = json.loads((run_dir / "train_metrics.json").read_text())
        results = evaluate_run(job, run_dir)
    except BaseException as e:
        if tracker:
            tracker.fail(e)
        raise
    results |= {
        "run_dir": str(run_dir),
        "global_step": train_metrics["global_step"],
        "resumed_from_step": train_metrics["resumed_from_step"],
        "train_loss": train_metrics["train_loss"],
        "eval_loss": train_metrics["eval_loss"],
        "trainable_params": train_metrics["trainable_params"],
        "total_params": train_metrics["total_params"],
        "train_tokens_per_s": train_metrics["train_tokens_per_s"],
        "splits": train_metrics["splits"],
    }
    if tracker:
        results["tracking"] = tracker.finish(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


# Files of a Trainer checkpoint that only resuming needs; final/ keeps the weights and tokenizer.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin")


def preflight(job: JobConfig, run_dir: Path) -> dict[str, Any]:
    """Everything that can be checked before workers start: a mistake is one line, and nothing runs.

    The data is loaded, cleaned and tokenized here once for all workers; target modules are checked on
    a weightless copy of the model; the checkpoint to resume from must be readable. Returns the splits'
    sizes and fingerprints.
    """
    from dsum.plan import meta_model

    train.resolve_checkpoint(job.train.resume_from, run_dir)
    if job.method.bits:
        models.quantization_config(job.method)
    skeleton = meta_model(job)
    if skeleton is not None and job.method.name != "full":
        models.target_modules(skeleton, job.method)
    return train.save_prepared(job, run_dir)


def train_on_ray(
    job: JobConfig, run_dir: Path, job_file: str, fresh: bool, address: str | None, tracker: track.Tracker | None = None
) -> None:
    """Train with Ray Train workers; the last reported checkpoint becomes run_dir/final.

    Ray keeps checkpoints under <storage>/<run name>: running the same job again (same train.run_name and
    storage) resumes from the latest one; fresh=True starts over.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from ray.train.torch import TorchConfig, TorchTrainer

    s = job.scaling
    storage = s.storage_path or str(Path(job.train.output_dir).resolve() / "ray")
    if fresh and "://" not in storage:
        shutil.rmtree(Path(storage) / run_dir.name, ignore_errors=True)
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not s.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU workers
    if not ray.is_initialized():
        # Workers get their environment from worker_runtime_env below; the driver passes none, so it
        # also runs inside `ray job submit`, whose job already carries a runtime env.
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address)
        else:  # a local Ray for this run alone
            ray.init(include_dashboard=False)
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    trainer = TorchTrainer(
        train.train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(),
            "job_file": job_file,
            "run_dir": str(run_dir),
            "resume_from": job.train.resume_from,
            "tracking": tracker.worker_config() if tracker else None,
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.save_total_limit),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # the workers' own error is inside; show it in one line
        raise DsumError(f"training failed: {_root_cause(e)}") from None
    if result.checkpoint is None:
        raise DsumError("training finished without a checkpoint")
    partial = run_dir / f".{train.FINAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(
            Path(ckpt) / RayTrainReportCallback.CHECKPOINT_NAME,
            partial,
            ignore=lambda _, names: [n for n in names if n.startswith(_RESUME_ONLY)],
        )
    train.publish(partial, run_dir / train.FINAL)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    return text[-400:] or type(e).__name__


def find_run(path: str | Path) -> Path:
    """A run directory from itself or its final/ adapter directory."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / "config.yaml").exists() and (candidate / train.FINAL).exists():
            return candidate
    raise DsumError(f"{path}: not a finished dsum run (no config.yaml beside a {train.FINAL}/ directory)")


def summarize(run_dir: Path, job: JobConfig, dialogues: list[str]) -> list[str]:
    """Summaries of dialogues by a run's fine-tuned model."""
    weights = str(run_dir / train.FINAL)
    tokenizer = models.load_tokenizer(job.model, weights)
    model = models.load_trained(job.model, job.method, weights)
    return evaluate.generate(model, tokenizer, dialogues, job.data, job.eval, job.model.task)


def prepare_run_dir(job: JobConfig, fresh: bool = False) -> Path:
    """The run's directory with its resolved config; a named run that exists is reused (resume)."""
    name = job.train.run_name or f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(job.train.output_dir) / name).resolve()
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    return run_dir


def evaluate_run(
    job: JobConfig, run_dir: Path, split: str | None = None, data_file: str | None = None
) -> dict[str, Any]:
    """Score the base and the fine-tuned model on the same examples; write predictions and a report."""
    weights = run_dir / train.FINAL
    if not weights.exists():
        raise DsumError(f"{run_dir}: no trained weights in {train.FINAL}/ (did training finish?)")
    rows, where = _eval_rows(job, split, data_file)
    out_dir = run_dir / "eval" / where
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(job.model, str(weights))

    base = models.load_base(job.model, job.method) if (job.eval.compare_base or job.method.name != "full") else None
    base_preds = _predict(base, tokenizer, rows, job) if job.eval.compare_base else None
    tuned = models.load_trained(job.model, job.method, str(weights), base)
    tuned_preds = _predict(tuned, tokenizer, rows, job)

    summary: dict[str, Any] = {
        "run": str(run_dir),
        "split": where,
        "examples": len(rows),
        "fingerprint": data.fingerprint(rows),
        "model": job.model.name,
        "method": job.method.name,
    }
    if job.model.task == "classification":
        summary["metrics"] = _classification_table(base_preds, tuned_preds, rows["label"], job.eval.bootstrap_samples)
        per_example = [dict(r) | {"tuned": t} for r, t in zip(rows, tuned_preds, strict=True)]
        plot = None
    else:
        summary, per_example, plot = _summary_eval(job, rows, base_preds, tuned_preds, summary, out_dir)
    if base_preds is not None:
        for rec, b in zip(per_example, base_preds, strict=True):
            rec["base"] = b
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for rec in per_example:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    summary["report"] = str(report.write(out_dir, summary, per_example, plot))
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    table = summary["metrics"]
    summary["tuned"] = {k: m["tuned"] for k, m in table.items()}
    if job.eval.compare_base:
        summary["base"] = {k: m["base"] for k, m in table.items()}
        summary["delta"] = {k: m["delta"] for k, m in table.items()}
    return summary


def _eval_rows(job: JobConfig, split: str | None, data_file: str | None):
    if data_file:
        rows, _ = data.load_file(job.data, data_file, job.model.task)
        where = Path(data_file).stem
    else:
        where = split or job.eval.split
        rows = data.load_splits(job.data, job.model.task)[0][where]
    if job.eval.max_samples:
        rows = rows.select(range(min(job.eval.max_samples, len(rows))))
    return rows, where


def _predict(model, tokenizer, rows, job: JobConfig):
    if job.model.task == "classification":
        return evaluate.classify(model, tokenizer, rows["text"], job.data, job.eval)
    return evaluate.generate(model, tokenizer, rows["dialogue"], job.data, job.eval, job.model.task)


def _classification_table(base_preds, tuned_preds, labels, samples: int) -> dict[str, dict[str, float]]:
    tuned = evaluate.classification_metrics(tuned_preds, labels)
    if base_preds is None:
        return {k: {"tuned": v} for k, v in tuned.items()}
    base = evaluate.classification_metrics(base_preds, labels)
    table = {k: {"base": base[k], "tuned": tuned[k], "delta": tuned[k] - base[k]} for k in tuned}
    # accuracy is a mean of per-example hits, so its difference gets a paired bootstrap interval
    hits_b = [float(p == y) for p, y in zip(base_preds, labels, strict=True)]
    hits_t = [float(p == y) for p, y in zip(tuned_preds, labels, strict=True)]
    table["accuracy"]["ci_low"], table["accuracy"]["ci_high"] = evaluate.paired_bootstrap(hits_b, hits_t, samples)
    return table


def _summary_eval(job: JobConfig, rows, base_preds, tuned_preds, summary, out_dir: Path):
    refs = rows["references"]
    sim_model = job.eval.similarity_model
    tuned_scores = evaluate.summary_scores(tuned_preds, refs, sim_model)
    base_scores = evaluate.summary_scores(base_preds, refs, sim_model) if base_preds is not None else None
    if base_scores is not None:
        summary["metrics"] = evaluate.compare(
            base_scores, tuned_scores, base_preds, tuned_preds, refs, job.eval.bootstrap_samples
        )
    else:
        summary["metrics"] = {k: {"tuned": v} for k, v in evaluate.mean_scores(tuned_scores).items()}
        summary["metrics"]["bleu"] = {"tuned": evaluate.bleu(tuned_preds, refs)}
    if not sim_model:
        summary["similarity_note"] = (
            "Semantic similarity skipped: set eval.similarity_model to a local sentence-encoder directory."
        )

    judged = judge.judge(job.eval.judge, rows["dialogue"], tuned_preds)
    if judged is None:
        summary["judge_note"] = (
            "No LLM judge: set eval.judge.base_url (or DSUM_JUDGE_BASE_URL) or eval.judge.local_model."
        )
    else:
        summary["judge"] = {"tuned": judge.summarize_judgements(judged)}
        if base_preds is not None:
            summary["judge"]["base"] = judge.summarize_judgements(
                judge.judge(job.eval.judge, rows["dialogue"], base_preds)
            )

    per_example = []
    for i, row in enumerate(rows):
        rec = dict(row) | {"tuned": tuned_preds[i], "tuned_scores": tuned_scores[i]}
        if base_scores is not None:
            rec["base_scores"] = base_scores[i]
        if judged is not None and i < len(judged):
            rec["judge"] = judged[i]
        per_example.append(rec)
    plot = report.box_plot(base_scores, tuned_scores, out_dir / "scores_boxplot.png")
    return summary, per_example, plot

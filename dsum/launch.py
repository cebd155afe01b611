"""Driver: run directory → train → evaluate base vs fine-tuned from what training saved → results.

Reads like the run it performs; each step is a function of its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from dsum import data, evaluate, judge, report, train
from dsum import model as models
from dsum.config import DsumError, JobConfig


def run_job(job: JobConfig) -> dict[str, Any]:
    run_dir = prepare_run_dir(job)
    _, train_metrics = train.fit(job, run_dir, resume_from=job.train.resume_from)
    results = evaluate_run(job, run_dir)
    results |= {
        "run_dir": str(run_dir),
        "global_step": train_metrics["global_step"],
        "train_loss": train_metrics["train_loss"],
        "eval_loss": train_metrics["eval_loss"],
        "trainable_params": train_metrics["trainable_params"],
        "total_params": train_metrics["total_params"],
        "train_tokens_per_s": train_metrics["train_tokens_per_s"],
        "splits": train_metrics["splits"],
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


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


def prepare_run_dir(job: JobConfig) -> Path:
    """The run's directory with its resolved config; a named run that exists is reused (resume)."""
    name = job.train.run_name or f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(job.train.output_dir) / name
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

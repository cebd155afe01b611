"""Driver: run directory → train → evaluate base vs fine-tuned from what training saved → results.

Reads like the run it performs; each step is a function of its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from dsum import data, evaluate, train
from dsum import model as models
from dsum.config import DsumError, JobConfig, MethodConfig


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


def prepare_run_dir(job: JobConfig) -> Path:
    """The run's directory with its resolved config; a named run that exists is reused (resume)."""
    name = job.train.run_name or f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(job.train.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    return run_dir


def evaluate_run(job: JobConfig, run_dir: Path, split: str | None = None) -> dict[str, Any]:
    """Score the base and the fine-tuned model on the same held-out examples; write predictions."""
    split = split or job.eval.split
    weights = run_dir / train.FINAL
    if not weights.exists():
        raise DsumError(f"{run_dir}: no trained weights in {train.FINAL}/ (did training finish?)")
    tokenizer = models.load_tokenizer(job.model, str(weights))
    rows = data.load_splits(job.data, job.model.task)[0][split]
    if job.eval.max_samples:
        rows = rows.select(range(min(job.eval.max_samples, len(rows))))

    base = models.load_base(job.model, job.method) if (job.eval.compare_base or job.method.name != "full") else None
    scores: dict[str, Any] = {"split": split, "examples": len(rows), "fingerprint": data.fingerprint(rows)}
    if job.eval.compare_base:
        scores["base"], base_preds = _score(base, tokenizer, rows, job)
    if job.method.name == "full":
        tuned = models.load_base(job.model, MethodConfig(name="full"), path=str(weights))
    else:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(weights))
    scores["tuned"], tuned_preds = _score(tuned, tokenizer, rows, job)
    if job.eval.compare_base:
        scores["delta"] = {k: scores["tuned"][k] - scores["base"][k] for k in scores["tuned"]}

    with (run_dir / f"predictions-{split}.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            rec = dict(row) | {"tuned": tuned_preds[i]} | ({"base": base_preds[i]} if job.eval.compare_base else {})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return scores


def _score(model, tokenizer, rows, job: JobConfig):
    if job.model.task == "classification":
        preds = evaluate.classify(model, tokenizer, rows["text"], job.data, job.eval)
        return evaluate.classification_metrics(preds, rows["label"]), preds
    preds = evaluate.generate(model, tokenizer, rows["dialogue"], job.data, job.eval, job.model.task)
    means, _ = evaluate.summary_metrics(preds, rows["references"])
    return means, preds

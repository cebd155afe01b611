"""Score a trained run: the base and the fine-tuned model on the same examples; predictions, a report and
an `EvalResult`. Reads only the run directory, so it runs wherever the run's final/ weights are."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from dsum import data, rundir
from dsum import model as models
from dsum.config import JobConfig
from dsum.errors import DsumError
from dsum.eval import generate, judge, metrics, predict, report

BERTSCORE_NOTE = "BERTScore skipped: set eval.bertscore.model to a local encoder directory (and eval.bertscore.layer)."
SIMILARITY_NOTE = "Semantic similarity skipped: set eval.similarity_model to a local sentence-encoder directory."
JUDGE_NOTE = "No LLM judge: set eval.judge.base_url (or DSUM_JUDGE_BASE_URL) or eval.judge.local_model."


@dataclasses.dataclass
class EvalResult:
    """One evaluation of a run: metric -> {base, tuned, delta, ci_low, ci_high} and where its files are."""

    run: str
    split: str
    examples: int
    fingerprint: str
    model: str
    method: str
    metrics: dict[str, dict[str, float]]
    report: str = ""
    predictions: str = ""
    judge: dict[str, dict[str, float]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def column(self, key: str) -> dict[str, float]:
        """{metric: value} of one column (base, tuned or delta) of the table."""
        return {k: m[key] for k, m in self.metrics.items() if key in m}

    @property
    def primary_metric(self) -> str:
        """What promotion compares: ROUGE-L for summaries, accuracy for classifiers."""
        return "rougeL" if "rougeL" in self.metrics else "accuracy"

    def per_example(self, metric: str) -> list[float]:
        """The fine-tuned model's score on each example, in order (from the predictions file)."""
        out = []
        for line in Path(self.predictions).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out.append(rec["tuned_scores"][metric] if metric != "accuracy" else float(rec["tuned"] == rec["label"]))
        return out

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tuned"] = self.column("tuned")
        if any("base" in m for m in self.metrics.values()):
            d["base"], d["delta"] = self.column("base"), self.column("delta")
        return d


def evaluate_run(
    job: JobConfig,
    run: rundir.RunDir,
    split: str | None = None,
    data_file: str | None = None,
    own: bool = True,
    loaded=None,
    runner: predict.Runner | None = None,
) -> EvalResult:
    """Score the base and the fine-tuned model on the same examples; write predictions and a report.

    `loaded`: the job's splits as the run loaded them (PreparedData.rows), read instead of loading the data
    again. The run's own evaluation (`own`, after training) is eval/<split>/, the one results.json points to.
    Any other (`dsum eval`) gets a folder of its own that names its source, eval/split-<split>/ or
    eval/file-<stem>/ (-2, -3, … when taken), and never replaces another finished evaluation: one that was
    stopped before its end, of the same rows, weights and settings, is continued in its folder.
    `runner` generates the predictions (dsum.eval.predict; default: in this process)."""
    if not run.final.exists():
        raise DsumError(f"{run}: no trained weights in {rundir.FINAL}/ (did training finish?)")
    check_encoders(job)
    rows, where = _eval_rows(job, split, data_file, loaded)
    wanted = predict.key(job, run.final, rows)
    out_dir = run.eval_dir(where) if own else _own_folder(run, f"{'file' if data_file else 'split'}-{where}", wanted)
    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = predict.predict(job, run.final, rows, out_dir, wanted, runner)
    base_preds, tuned_preds = predicted.get("base"), predicted["tuned"]

    result = EvalResult(
        run=str(run),
        split=where,
        examples=len(rows),
        fingerprint=data.fingerprint(rows),
        model=job.model.name,
        method=job.method.name,
        metrics={},
        predictions=str(out_dir / rundir.PREDICTIONS),
    )
    if job.model.task == "classification":
        result.metrics = _classification_table(base_preds, tuned_preds, rows["label"], job.eval.bootstrap_samples)
        per_example = [dict(r) | {"tuned": t} for r, t in zip(rows, tuned_preds, strict=True)]
        plot = None
    else:
        per_example, plot = _summary_eval(job, rows, base_preds, tuned_preds, result, out_dir)
    if base_preds is not None:
        for rec, b in zip(per_example, base_preds, strict=True):
            rec["base"] = b
    rundir.write_text(
        Path(result.predictions), "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in per_example)
    )
    result.report = str(report.write(out_dir, dataclasses.asdict(result), per_example, plot))
    rundir.write_json(out_dir / rundir.EVAL_SUMMARY, result.as_dict())
    (out_dir / predict.PARTIAL).unlink(missing_ok=True)  # all of it is in the predictions file now
    return result


def _own_folder(run: rundir.RunDir, name: str, wanted: dict) -> Path:
    """eval/<name>[-N]/ of an evaluation of the same outputs (`wanted`) that was stopped before its end, else a
    new one."""
    existing, n = [], 1
    while (folder := run.eval_dir(name if n == 1 else f"{name}-{n}")).exists():  # (numbered without gaps)
        existing.append(folder)
        n += 1
    return predict.unfinished(existing, wanted, rundir.EVAL_SUMMARY) or run.new_eval_dir(name)


def check_encoders(job: JobConfig) -> None:
    """The encoders the evaluation reads (BERTScore's, the similarity one) are encoders and have the layer
    asked for: one line each, before anything is generated (or, from preflight, trained)."""
    if job.eval.bertscore.model:
        b = job.eval.bertscore
        metrics.check_encoder(b.model, "eval.bertscore.model", b.layer, "eval.bertscore.layer")
    if job.eval.similarity_model:
        metrics.check_encoder(job.eval.similarity_model, "eval.similarity_model")


def summarize(run: rundir.RunDir, job: JobConfig, dialogues: list[str]) -> list[str]:
    """Summaries of dialogues by a run's fine-tuned model."""
    weights = str(run.final)
    tokenizer = models.load_tokenizer(job.model, weights)
    model = models.load_trained(job.model, job.method, weights, device_map=models.inference_device_map())
    return generate.generate(model, tokenizer, dialogues, job.data, job.eval, job.model.task)


def _eval_rows(job: JobConfig, split: str | None, data_file: str | None, loaded=None):
    if data_file:
        rows, _ = data.load_file(job.data, data_file, job.model.task)
        where = Path(data_file).stem
    else:
        where = split or job.eval.split
        rows = (loaded if loaded is not None else data.load_splits(job.data, job.model.task)[0])[where]
    n = job.eval.max_samples
    if n and len(rows) > n:
        if job.eval.sample_seed is None:
            rows = rows.select(range(n))
        else:  # a seeded choice, kept in the source's order
            rows = rows.select(sorted(random.Random(job.eval.sample_seed).sample(range(len(rows)), n)))
    return rows, where


def _classification_table(base_preds, tuned_preds, labels, samples: int) -> dict[str, dict[str, float]]:
    tuned = metrics.classification_metrics(tuned_preds, labels)
    if base_preds is None:
        return {k: {"tuned": v} for k, v in tuned.items()}
    base = metrics.classification_metrics(base_preds, labels)
    table = {k: {"base": base[k], "tuned": tuned[k], "delta": tuned[k] - base[k]} for k in tuned}
    # accuracy is a mean of per-example hits, so its difference gets a paired bootstrap interval
    hits_b = [float(p == y) for p, y in zip(base_preds, labels, strict=True)]
    hits_t = [float(p == y) for p, y in zip(tuned_preds, labels, strict=True)]
    table["accuracy"]["ci_low"], table["accuracy"]["ci_high"] = metrics.paired_bootstrap(hits_b, hits_t, samples)
    return table


def _summary_eval(job: JobConfig, rows, base_preds, tuned_preds, result: EvalResult, out_dir: Path):
    refs = rows["references"]
    sim_model, bs = job.eval.similarity_model, job.eval.bertscore
    tuned_scores = metrics.summary_scores(tuned_preds, refs, sim_model, bs)
    base_scores = metrics.summary_scores(base_preds, refs, sim_model, bs) if base_preds is not None else None
    if base_scores is not None:
        result.metrics = metrics.compare(
            base_scores, tuned_scores, base_preds, tuned_preds, refs, job.eval.bootstrap_samples
        )
    else:
        result.metrics = {k: {"tuned": v} for k, v in metrics.mean_scores(tuned_scores).items()}
        result.metrics["bleu"] = {"tuned": metrics.bleu(tuned_preds, refs)}
    judged = judge.judge(job.eval.judge, rows["dialogue"], tuned_preds)
    if judged is None:
        result.notes.append(JUDGE_NOTE)
    else:
        result.judge = {"tuned": judge.summarize_judgements(judged)}
        if base_preds is not None:
            result.judge["base"] = judge.summarize_judgements(judge.judge(job.eval.judge, rows["dialogue"], base_preds))
    if not bs.model:
        result.notes.append(BERTSCORE_NOTE)
    if not sim_model:  # after the judge's note, where the report has always shown it
        result.notes.append(SIMILARITY_NOTE)

    per_example = []
    for i, row in enumerate(rows):
        rec = dict(row) | {"tuned": tuned_preds[i], "tuned_scores": tuned_scores[i]}
        if base_scores is not None:
            rec["base_scores"] = base_scores[i]
        if judged is not None and i < len(judged):
            rec["judge"] = judged[i]
        per_example.append(rec)
    plot = report.box_plot(base_scores, tuned_scores, out_dir / rundir.BOX_PLOT)
    return per_example, plot

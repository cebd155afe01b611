"""Sweeps before and after Ray Tune: a job's search space checked and turned into trial jobs, and the
trials' results ranked. No Ray here; dsum/cluster/tune.py runs the trials.

Every sampled job is a job like any other: the base job's dict with the trial's values at their dotted keys,
validated by `config.from_dict`. `check` finds what would fail in a trial before any trial starts: each
choice and each range bound is applied to the base job and validated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from dsum import config
from dsum.config import JobConfig
from dsum.errors import ConfigError


def trial_job(job: JobConfig, params: dict[str, Any], source: str = "<trial>") -> JobConfig:
    """The base job with a trial's values at their dotted keys (and alpha tied to r when it is not searched)."""
    raw = copy.deepcopy(job.to_dict())
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    t = job.tune
    if "method.r" in params and "method.alpha" not in params and t.alpha_ratio is not None:
        raw["method"]["alpha"] = t.alpha_ratio * params["method.r"]
    return config.from_dict(raw, source=source)


EVALUATIONS = 4  # a trial's evaluations where train.eval_steps is not set: ASHA's rungs at 1, 2 and 4 of them


def with_evaluations(job: JobConfig, train_rows: int) -> JobConfig:
    """The job a sweep runs: train.eval_steps as set, else EVALUATIONS evenly over the run's optimizer steps
    (a sweep needs its metric during training; a plain run evaluates at the end only)."""
    if job.train.eval_steps is not None:
        return job
    every = max(1, job.optimizer_steps(train_rows) // EVALUATIONS)
    return job.model_copy(update={"train": job.train.model_copy(update={"eval_steps": every})})


def check(job: JobConfig, source: str) -> None:
    """What would stop a sweep after it started, as one ConfigError before any trial: the metric is never
    reported (evaluations past the last step, or no validation split), or a value of the space makes an
    invalid job."""
    t = job.tune
    if (
        job.train.eval_steps is not None
        and job.train.max_steps is not None
        and job.train.eval_steps > job.train.max_steps
    ):
        raise ConfigError(
            f"{source}: tune.metric: train.eval_steps ({job.train.eval_steps}) is past train.max_steps "
            f"({job.train.max_steps}): the trials would never report {t.metric}"
        )
    if t.metric == "eval_rougeL" and not job.train.eval_rouge_samples:
        raise ConfigError(
            f"{source}: tune.metric: eval_rougeL is reported only with train.eval_rouge_samples set "
            "(validation rows generated at each evaluation, e.g. train.eval_rouge_samples=16)"
        )
    for key, spec in t.space.items():
        for value in _probes(spec):
            try:
                trial_job(job, {key: value}, source)
            except ConfigError as e:
                raise ConfigError(
                    f"{source}: tune.space.{key}={value!r} makes an invalid job: {_detail(e, source)}"
                ) from None


@dataclass(frozen=True)
class Trial:
    """One trial's outcome, as the sweep ranks it and sweep.json, MLflow and the table show it."""

    trial_id: str
    params: dict[str, Any]  # its values of the searched keys
    value: float | None  # the sweep's metric at its last report (None: never reported, or NaN)
    step: int | None  # the optimizer step of its last report
    stopped_early: bool  # the scheduler stopped it before its last step
    error: str | None  # the first line of its error, if it failed
    # what the trial cost: its segments (its start, each resumption after a pause or a restore), their
    # start-up in all (function start to first optimizer step) and their time after it (seconds)
    segments: int = 0
    startup_s: float | None = None
    train_s: float | None = None
    startup_parts: dict[str, float] = field(default_factory=dict)  # the start-up in parts, summed over segments

    def as_dict(self, metric: str) -> dict[str, Any]:
        """As sweep.json and the MLflow parent's trials.json hold it: the metric under its own name."""
        return {"trial_id": self.trial_id, "params": self.params, metric: self.value, "step": self.step,
                "stopped_early": self.stopped_early, "error": self.error, "segments": self.segments,
                "startup_s": self.startup_s, "train_s": self.train_s, "startup_parts": self.startup_parts}  # fmt: skip


def rank(trials: list[Trial], mode: str) -> list[Trial]:
    """Trials best first; those that never reported the metric last."""

    def key(t: Trial):
        if t.value is None or math.isnan(t.value):
            return (1, 0.0)
        return (0, t.value if mode == "min" else -t.value)

    return sorted(trials, key=key)


def table(trials: list[Trial], metric: str, keys: list[str]) -> str:
    """The ranked trials as a text table: trial, the searched values, the metric, steps, stopped early, and
    what each cost: its segments' start-up and their time after it, in seconds (a pause or a restore adds a
    segment: `starts`)."""
    head = ["trial", *keys, metric, "steps", "early stop", "starts", "start-up s", "train s"]
    rows = [head]
    for t in trials:
        shown = f"{t.value:.4f}" if t.value is not None else "-"
        cost = [str(t.segments or "-"), *(f"{s:.1f}" if s is not None else "-" for s in (t.startup_s, t.train_s))]
        rows.append([t.trial_id, *(_fmt(t.params.get(k)) for k in keys), shown, str(t.step if t.step is not None else "-"),
                     "yes" if t.stopped_early else "", *cost])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _probes(spec: dict[str, Any]) -> list[Any]:
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        return list(arg)
    low, high = arg
    return [low, high - 1] if kind == "randint" else [low, high]


def _detail(e: ConfigError, source: str) -> str:
    return str(e).removeprefix(f"{source}: ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)

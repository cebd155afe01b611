"""`dsum train` on the driver: run directory → preflight → MLflow run → Ray Train → evaluation → tracking.

Reads like the run it performs. It sits above the Ray and tracking layers and ties them together; the
CLI calls it, and nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from dsum import plan, rundir, sweep
from dsum.cluster import evaluate, launch
from dsum.config import JobConfig
from dsum.errors import DsumError
from dsum.eval.run import EvalResult, evaluate_run
from dsum.tracking import track
from dsum.tracking.track import Tracker
from dsum.train import TrainResult, startup


@dataclasses.dataclass
class RunResult:
    run: rundir.RunDir
    train: TrainResult
    eval: EvalResult
    splits: dict[str, dict[str, Any]]
    tracking: dict[str, Any] | None = None
    marks: dict[str, float] = dataclasses.field(default_factory=dict)  # the driver's start-up (_start)

    @property
    def startup(self) -> dict[str, float]:
        return startup(self.marks | self.train.startup)

    def as_dict(self) -> dict[str, Any]:
        """The results as `--json` prints them and results.json holds them: the evaluation's table and
        the training figures side by side (the per-step log stays in train_metrics.json), and start-up's
        parts in seconds."""
        train = {k: v for k, v in self.train.as_dict().items() if k not in ("log_history", "startup")}
        return self.eval.as_dict() | train | {
            "run_dir": str(self.run), "splits": self.splits, "tracking": self.tracking, "startup": self.startup
        }  # fmt: skip


@dataclasses.dataclass
class SweepResult:
    run: rundir.RunDir
    metric: str
    mode: str
    trials: list[sweep.Trial]  # ranked, best first
    restored: bool  # the sweep went on from its saved state
    concurrency: int  # trials at once
    table: str
    tracking: dict[str, Any] | None = None

    @property
    def best(self) -> sweep.Trial:
        return self.trials[0]

    @property
    def best_job(self) -> Path:
        return self.run.path / rundir.BEST

    def as_dict(self) -> dict[str, Any]:
        """The sweep as `--json` prints it and sweep.json holds it."""
        return {
            "run_dir": str(self.run), "metric": self.metric, "mode": self.mode,
            "best": self.best.as_dict(self.metric), "best_job": str(self.best_job),
            "trials": [t.as_dict(self.metric) for t in self.trials], "restored": self.restored,
            "max_concurrent_trials": self.concurrency, "table": self.table, "tracking": self.tracking,
        }  # fmt: skip


def _start(job: JobConfig, fresh: bool, address: str | None, sweep: bool = False, marks: dict | None = None):
    """The job with its CPUs per worker resolved (launch.resolve_cpus), the run directory and the prepared
    data, once every check has passed. Mistakes stop here, each as one line, before anything is written: a
    tracking server that doesn't answer; the job or its data (preflight); a storage path (bucket) that can't
    be reached; an output dir that can't be made; no cluster at the address, or one that can never hold the
    job. A sweep's local Ray runs the dashboard (launch.connect). `marks` gets when start-up's parts end
    (train.STARTUP)."""
    marks = {} if marks is None else marks
    from dsum import train  # noqa: F401  (the training stack, which preflight needs: start-up's first part)

    marks["imported"] = time.time()
    run = rundir.locate(job)
    track.check_reachable(job)
    prepared = plan.preflight(job)
    launch.check_storage(job)
    rundir.check_creatable(run)
    marks["preflight"] = time.time()
    launch.connect(address, dashboard=sweep)
    marks["ray"] = time.time()
    job = launch.resolve_cpus(job, sweep=sweep)
    launch.check_fits(job)
    return job, rundir.create(job, fresh, run), prepared


class Progress:
    """What the terminal shows while the workers train (on stderr: stdout is for the results): a line at each
    step rank 0 logs, with the figures a user watches."""

    SHOWN = (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("eval_rougeL", "{:.4f}"), ("learning_rate", "{:.2e}"),
             ("grad_norm", "{:.3f}"))  # fmt: skip

    def __init__(self, job: JobConfig, train_rows: int):
        # epochs over packed rows may take fewer steps than the rows make (dsum.batches)
        self.total = f"{'≤' if job.data.packing and not job.train.max_steps else ''}{job.optimizer_steps(train_rows)}"

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        shown = [f"{key} {form.format(metrics[key])}" for key, form in self.SHOWN if key in metrics]
        if shown:
            print(f"step {step}/{self.total}: {', '.join(shown)}", file=sys.stderr, flush=True)


def run_job(
    job: JobConfig,
    job_file: str = "<job>",
    fresh: bool = False,
    address: str | None = None,
    started: float | None = None,
) -> RunResult:
    """`dsum train`; `started`: when the command started (time.time()), where its start-up is counted from."""
    marks = {"command": started or time.time()}
    job, run, prepared = _start(job, fresh, address, marks=marks)
    tracker = Tracker.open(job, run, prepared.splits)
    try:
        steps = tracker.step_target() if tracker else None
        progress = Progress(job, prepared.splits["train"]["rows"])
        trained = launch.train(
            job, run, prepared, job_file, fresh=fresh, address=address, steps=steps, progress=progress, marks=marks
        )
        rundir.write_json(run.train_metrics, trained.as_dict() | {"splits": prepared.splits})
        print(f"evaluating: {_evaluating(job)} on the {job.eval.split} split", file=sys.stderr, flush=True)
        evaluated = evaluate_run(job, run, loaded=prepared.rows, runner=evaluate.runner(job))
    except BaseException as e:
        if tracker:
            tracker.fail(e)
        raise
    result = RunResult(run, trained, evaluated, prepared.splits, marks=marks)
    try:
        if tracker:
            result.tracking = tracker.finish(result)
    except DsumError as e:
        result.tracking = {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "error": str(e)}
        raise
    finally:
        rundir.write_json(run.results, result.as_dict())  # the results are kept whatever tracking did
    return result


@dataclasses.dataclass(frozen=True)
class _SweepProgress:
    """What the terminal shows while a sweep runs (stderr): each trial as it starts, with its values, the
    sweep's metric at each of its evaluations, and a trial's failure in one line."""

    metric: str

    def started(self, trial_id: str, params: dict[str, Any]) -> None:
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"trial {trial_id}: started, {values}", file=sys.stderr, flush=True)

    def result(self, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        if self.metric in metrics:
            print(
                f"trial {trial_id}: step {step}: {self.metric} {metrics[self.metric]:.4f}", file=sys.stderr, flush=True
            )

    def failed(self, trial_id: str, message: str) -> None:
        print(f"trial {trial_id}: failed: {message}", file=sys.stderr, flush=True)


def _each(*listeners):
    """One listener that calls each of `listeners` in turn with the same event."""

    def every(*event) -> None:
        for listener in listeners:
            listener(*event)

    return every


def _evaluating(job: JobConfig) -> str:
    cap = f" (at most {job.eval.max_samples} examples)" if job.eval.max_samples else ""
    return ("the base and the fine-tuned model" if job.eval.compare_base else "the fine-tuned model") + cap


def run_sweep(
    job: JobConfig, job_file: str = "<job>", fresh: bool = False, address: str | None = None
) -> dict[str, Any]:
    """`dsum tune`: check the space (one line, before any trial), run the trials on Ray Tune, rank them,
    write sweep.json and best.yaml, and log the sweep to MLflow (a parent run, a nested run per trial)."""
    import yaml

    from dsum.cluster import tune
    from dsum.tracking.track import SweepTracker

    sweep.check(job, job_file)
    # (the trials take auto as 1 CPU each; best.yaml keeps the job's own value, for the run that follows)
    _, run, prepared = _start(job, fresh, address, sweep=True)
    job = sweep.with_evaluations(job, prepared.splits["train"]["rows"])
    tracker = SweepTracker.open(job, run, prepared.splits)
    shown = _SweepProgress(job.tune.metric)
    events = tune.SweepEvents(shown.started, shown.result, shown.failed)
    if tracker:  # the terminal, then MLflow
        events = tune.SweepEvents(
            _each(shown.started, tracker.trial_started), _each(shown.result, tracker.trial_result), shown.failed
        )
    try:
        outcome = tune.run(job, run.name, prepared, job_file, address=address, events=events)
        if not outcome.trials or outcome.trials[0].value is None:
            raise DsumError(f"tune: no trial reported {job.tune.metric}; see the trials' errors in {run}")
        best = outcome.trials[0]
        best_job = sweep.trial_job(job, best.params, job_file)
        best_dict = best_job.to_dict() | {"name": f"{job.name}-best"}
        best_dict["train"] = best_dict["train"] | {"run_name": None}
        best_yaml = f"# the best trial ({best.trial_id}) of sweep {run.name}\n" + yaml.safe_dump(
            best_dict, sort_keys=False
        )
        rundir.write_text(run.path / rundir.BEST, best_yaml)
        table = sweep.table(outcome.trials, job.tune.metric, outcome.keys)
    except BaseException as e:
        if tracker:
            tracker.fail(e)
        raise
    result = SweepResult(run, job.tune.metric, job.tune.mode, outcome.trials, outcome.restored, outcome.concurrency,
                         table)  # fmt: skip
    try:
        if tracker:
            result.tracking = tracker.finish(outcome.trials, job.tune.metric, table, best_yaml)
    except Exception as e:
        result.tracking = {"run_id": tracker.parent_id, "tracking_uri": tracker.uri, "error": str(e)}
        raise DsumError(f"tracking: the sweep's results are in {run}; MLflow at {tracker.uri} failed: {e}") from None
    finally:
        rundir.write_json(run.path / rundir.SWEEP, result.as_dict())
    return result

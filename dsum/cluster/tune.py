"""Ray Tune on the driver: a sweep of trials, each training the job `dsum train` would with the trial's values,
reporting its metric to Tune at every evaluation; ASHA stops the weak ones early.

A trial is a function in a Tune actor: it samples nothing itself (Tune hands it the trial's values) and
builds its job with `sweep.trial_job`. Where one process is the whole run (one worker, no DeepSpeed, no
tune.trial_timeout_s: `trains_in_trial`) the trial trains in that actor itself, with the trial's resources,
and Tune keeps the actor, its imports loaded, for the next trial (reuse_actors); every other trial runs Ray
Train (the same `TorchTrainer` as `dsum train`, launch.build_trainer) under the trial's id from a 0-CPU
actor, rank 0's reports reaching Tune through TuneReportCallback. Either way the worker's code is the same
(dsum.cluster.worker.train). ASHA's clock is the optimizer step each report carries, not Tune's
`training_iteration`: a restored trial resumes from its last checkpoint, and Tune counts its reports from 1
again while its steps go on. The sweep's state lives in the storage path; the same command run again
restores it: finished trials are kept, unfinished ones go on from their last checkpoint, and the
scheduler's rungs come back with them (_Relay).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from dsum import sweep
from dsum.cluster import launch, resume
from dsum.config import JobConfig, from_dict
from dsum.errors import one_line
from dsum.steps import FINAL_KEY, STEP

if TYPE_CHECKING:  # a trial's process never imports the training stack (torch comes with Ray Train)
    from dsum.train import PreparedData


@dataclass
class SweepEvents:
    """What the driver hears while trials run (the tracking layer logs them): a trial started with its
    values; a trial reported metrics at an evaluation (at an optimizer step); a trial failed (one line)."""

    on_start: Callable[[str, dict[str, Any]], None] = lambda trial_id, params: None
    on_result: Callable[[str, int, dict[str, float]], None] = lambda trial_id, step, metrics: None
    on_error: Callable[[str, str], None] = lambda trial_id, message: None


@dataclass
class SweepOutcome:
    trials: list[sweep.Trial]  # ranked, best first
    restored: bool
    concurrency: int
    keys: list[str] = field(default_factory=list)


def run(
    job: JobConfig,
    name: str,
    prepared: PreparedData,
    job_file: str = "<job>",
    address: str | None = None,
    events: SweepEvents | None = None,
) -> SweepOutcome:
    in_trial = trains_in_trial(job)
    # Ray Train frees a stopped trial's worker group through the dashboard (launch.connect); a sweep whose
    # trials train in their own actors starts no worker group
    launch.connect(address, dashboard=not in_trial)
    # a failed trial is one line on the terminal (SweepEvents.on_error), its traceback in its error file
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    t = job.tune
    storage = resume.storage_path(job)
    path = f"{storage.rstrip('/')}/{name}"
    # the data goes into the object store once; each trial reads it there (or hands its workers the reference)
    trainable = tune.with_parameters(
        _trial, data=(ray.put(prepared.for_workers()),), base=job.to_dict(), job_file=job_file
    )
    trainable = tune.with_resources(trainable, _trial_resources(job))
    concurrency = t.max_concurrent_trials or _fits(job)
    steps = job.optimizer_steps(prepared.splits["train"]["rows"])  # ASHA's max_t
    # With promotions the scheduler holds the sweep to `concurrency` running trials; paused ones count as
    # live for a searcher's limit, so the searcher has none (it may suggest every trial up front).
    searching = None if t.scheduler == "asha-promote" else concurrency
    restored = tune.Tuner.can_restore(path)
    tuner = tuner_for(
        trainable,
        storage,
        name,
        param_space={"params": {k: _domain(spec) for k, spec in t.space.items()}},
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            search_alg=_searcher(job, searching),
            scheduler=_scheduler(job, steps, concurrency),
            max_concurrent_trials=searching if t.search == "optuna" else None,
            trial_dirname_creator=lambda trial: trial.trial_id,
            # the next trial (or a paused one resumed) trains in a finished trial's process: its imports
            # (torch, transformers, peft) already loaded; Tune reuses an actor only for the same resources
            reuse_actors=in_trial,
        ),
        run_config=_in_trial_run_config(job) if in_trial else {},
    )
    try:
        with _listening(events or SweepEvents()):
            grid = tuner.fit()
    finally:  # the workers of the trials Tune paused or stopped were killed: their scratch stays on their nodes
        launch.reap_scratch()
    trials = [_trial_outcome(r, t.metric) for r in grid]
    return SweepOutcome(sweep.rank(trials, t.mode), restored, concurrency, list(t.space))


def tuner_for(
    trainable, storage: str, name: str, param_space: dict, tune_config: tune.TuneConfig, run_config: dict | None = None
) -> tune.Tuner:
    """The sweep `name` in `storage`: restored when its state is there (the same command run again: finished
    trials kept, unfinished ones go on from their last checkpoint, the scheduler's rungs and decisions as they
    were when Tune last saved the sweep), else a new one with `tune_config` (and `run_config`: more of
    tune.RunConfig's arguments)."""
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[_Relay(tune_config.scheduler), _ResultJson(), _ProgressCsv()],
            verbose=0,
            **(run_config or {}),
        ),
    )


def trains_in_trial(job: JobConfig) -> bool:
    """Whether a trial of this sweep trains in its own Tune actor rather than a Ray Train run: when one
    process is the whole run. Not with more than one worker (Ray Train's worker group and torch.distributed),
    DeepSpeed (its engine sets up torch.distributed, which Ray Train does for it), or tune.trial_timeout_s
    (what watches a trial for a hang must live outside the process that hangs: the trial's actor watches its
    Train run, launch.fit_reporting)."""
    s = job.scaling
    return s.num_workers == 1 and s.strategy == "ddp" and job.tune.trial_timeout_s is None


def _trial_resources(job: JobConfig) -> dict[str, float]:
    """What a trial's actor holds: where it trains itself, what its one worker would (launch.worker_shape, the
    shape launch.build_trainer's ScalingConfig asks for); where it runs Ray Train, no CPU (its workers hold
    them), and a Tune bundle needs one nonzero amount."""
    return launch.worker_shape(job) if trains_in_trial(job) else {"cpu": 0, "memory": 1}


def _in_trial_run_config(job: JobConfig) -> dict[str, Any]:
    """Tune's run settings for trials that train in their own actors, as Ray Train's are for its runs
    (launch.build_trainer): the checkpoints kept per trial, a failed trial restarted from its last one."""
    return {
        "checkpoint_config": tune.CheckpointConfig(num_to_keep=job.train.save_total_limit),
        "failure_config": tune.FailureConfig(max_failures=job.scaling.max_failures),
    }


def _trial(config: dict, data: tuple[ray.ObjectRef], base: dict, job_file: str) -> None:
    """One trial: its job trained (in this actor, or by Ray Train under the trial's id), every evaluation
    reported to Tune."""
    started = time.time()  # this segment's start-up runs from here to its first step (worker.log_startup)
    job = sweep.trial_job(from_dict(base, source=job_file), config["params"], job_file)
    # Each evaluation goes to Tune with the checkpoint saved at the same step: one report per evaluation.
    job = job.model_copy(update={"train": job.train.model_copy(update={"save_steps": job.train.eval_steps})})
    if trains_in_trial(job):
        _train_here(job, data[0], job_file, started)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id, timeout = tune.get_context().get_trial_id(), job.tune.trial_timeout_s
    relay = launch.new_relay() if timeout else None  # rank 0's step metrics: the trial's sign of life
    trainer = launch.build_trainer(
        job,
        trial_id,
        data[0],
        job_file,
        callbacks=[TuneReportCallback()],
        relay=launch.RelaySink(relay) if relay is not None else None,
        started=started,
    )
    with _reports_drained():
        if relay is None:
            trainer.fit()
        else:
            launch.fit_reporting(trainer, relay, timeout)


def _train_here(job: JobConfig, data: ray.ObjectRef, job_file: str, started: float) -> None:
    """A one-process trial trains in this actor: the worker's own code (worker.train) with Tune's report and
    checkpoint in place of Ray Train's. A paused trial resumed, or a restored one, starts from the checkpoint
    Tune holds of it (tune.get_checkpoint); a trial Tune stops or pauses ends at its next report (Tune's
    session exits the function's thread there)."""
    import warnings

    from dsum.cluster import worker

    os.environ.update(launch.worker_env(job))  # a Train worker's (PYTHONWARNINGS is read at start: set here too)
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = worker.WorkerSpec(job.to_dict(), job_file, data, started=started)
    worker.train(spec, {"train_fn": time.time()}, tune.report, tune.get_checkpoint)


@contextlib.contextmanager
def _reports_drained():
    """The trial's function returns only once the trial's process has handed Tune every report of its Train run.

    Without this a trial can hang for good (ray 2.60; seen with four trials on two CPUs): TuneReportCallback puts
    each report in a queue actor, and the trial's main thread, when the driver asks for the next result, takes it
    from there and puts it in the session's result queue (maxsize 1), which only that thread reads
    (train/_internal/session.py `_get_result_from_queues`). When the function returns, its thread puts a last
    result in that queue too (tune/trainable/function_trainable.py, RESULT_DUPLICATE). If the driver was slow to ask
    for the run's last report, both happen at once: the main thread blocks putting the last report behind the
    function's, which only it could take. So: the main thread takes and hands over a report under a lock, and
    the function, its Train run over (nothing more will come), waits under that lock for the queue to be empty."""
    from ray.train._internal.session import get_session

    session = get_session()
    take = session._get_result_from_queues
    handing = threading.Lock()

    def take_one(block: bool):
        with handing:
            return take(block)

    session._get_result_from_queues = take_one
    try:
        yield
    finally:
        queue = session._inter_actor_queue
        while queue is not None:
            with handing:
                try:
                    if queue.empty():
                        break
                except ray.exceptions.RayError:  # (the queue's actor is gone: nothing is left to hand over)
                    break
            time.sleep(0.05)


def _domain(spec: dict[str, Any]):
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(arg)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*arg)


def _searcher(job: JobConfig, concurrency: int | None):
    """Tune applies max_concurrent_trials to a Searcher (Optuna) only; the random search generator holds
    its own limit, or it would start every trial at once (None: no limit, the scheduler holds one)."""
    t = job.tune
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=t.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency or 0)


def _scheduler(job: JobConfig, steps: int, concurrency: int):
    """ASHA on the optimizer step (every report has one: "step"), so that a trial restored mid-way is
    judged at the step it reached; tune.grace_period counts evaluations. Ray's ASHA (stops trials), or
    ASHA with promotions (pauses them; dsum/cluster/asha.py)."""
    t = job.tune
    if t.scheduler == "none":
        return None
    grace = min(t.grace_period * job.train.eval_steps, steps)
    if t.scheduler == "asha-promote":
        from dsum.cluster.asha import PromotingASHA

        # Trials that train in their own actors hold their CPUs there, so where the cluster holds `concurrency`
        # of them Tune itself runs no more at once: one more is let through (ahead) to wait for a running one's
        # resources. Tune hands a stopped trial's process to a waiting trial only (ray 2.60,
        # tune/execution/tune_controller.py, _maybe_cache_trial_actor: once the searcher has no more trials, an
        # actor is kept for reuse only while another trial is staged). A smaller tune.max_concurrent_trials is
        # the scheduler's to hold.
        ahead = 1 if trains_in_trial(job) and t.max_concurrent_trials is None else 0
        return PromotingASHA(STEP, t.metric, t.mode, steps, grace, t.reduction_factor, concurrency, ahead)
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=STEP,
        max_t=steps,
        grace_period=grace,
        reduction_factor=t.reduction_factor,
    )


def _fits(job: JobConfig) -> int:
    """Trials the cluster holds at once: a Train run starts only when all its workers fit, so more at
    once than that would wait on each other forever."""
    return max(1, launch.workers_that_fit(job) // job.scaling.num_workers)


def _trial_outcome(result, metric: str) -> sweep.Trial:
    """A trial's outcome from Tune's Result: its last report's metric and step; it finished if that report
    is the final one (FINAL_KEY: the TrainResult, which rank 0 reports once training is over). Its id is the
    one Tune puts in every report; its directory's name is the id only as a rule: a restored trial whose
    directory Tune had not yet saved gets a new one, the id and a suffix, where the old one is left (ray 2.60,
    tune/experiment/trial.py, _create_unique_logdir_name)."""
    m = result.metrics or {}
    value = m.get(metric)
    return sweep.Trial(
        trial_id=m.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
        params=(result.config or {}).get("params", {}),
        value=float(value) if isinstance(value, int | float) and not math.isnan(value) else None,
        step=m.get(STEP),
        stopped_early=result.error is None and FINAL_KEY not in m,
        error=_error_line(result.error) if result.error else None,
        **_segments(result.metrics_dataframe),
    )


def _segments(reports) -> dict[str, Any]:
    """A trial's segments (its start, each resumption after a pause or a restore) from its reports to Tune
    (Tune's own table of them, progress.csv): how many, their start-up in all (each segment's function start
    to its first step, worker.log_startup) and their time after it to their last report (Tune's
    time_since_restore, from the same function start)."""
    if reports is None or "trial_segment" not in reports:
        return {}
    segments = reports.dropna(subset=["trial_segment", "startup_total_s"]).groupby("trial_segment")
    startup = segments["startup_total_s"].first()
    after = segments["time_since_restore"].max() - startup
    parts = {c.removeprefix("startup_"): round(float(segments[c].first().sum()), 2)
             for c in reports.columns if c.startswith("startup_") and c != "startup_total_s"}  # fmt: skip
    return {"segments": len(startup), "startup_s": round(float(startup.sum()), 2),
            "train_s": round(float(after.clip(lower=0).sum()), 2), "startup_parts": parts}  # fmt: skip


# This driver's listeners while a sweep runs; _Relay looks them up when Tune calls it. Module state because
# Tune pickles its callbacks into the sweep's state and Tuner.restore (ray 2.5x: no run_config argument) brings
# back the pickled ones: a listener held by the callback would be a copy of the one that started the sweep.
_events = SweepEvents()


@contextlib.contextmanager
def _listening(events: SweepEvents):
    global _events
    _events = events
    try:
        yield
    finally:
        _events = SweepEvents()


class _Relay(tune.Callback):
    """Tune's trial events on the driver, handed to this driver's SweepEvents (the module's `_events`, which
    `run` sets: Tune saves its callbacks with the sweep and a restored sweep gets the saved ones back).

    It also carries the scheduler's state across a restore. Tune (ray 2.60, tune/execution/tune_controller.py:
    save_to_dir, resume) saves its searcher's and its callbacks' state beside the trials' at each experiment
    checkpoint, but not its scheduler's: a restored sweep's ASHA would start with empty rungs, so the restored
    trials would be first at every rung again and nothing would be stopped that the first driver would have
    stopped. This callback's state is the scheduler's, written by the scheduler's own `save` (Ray's ASHA
    pickles its brackets; PromotingASHA its rungs), taken in the same step as the trials' statuses, and put
    back with `restore` before Tune re-adds the restored trials. The scheduler is the one this callback was
    built with: the Tuner pickles both in one file (tuner.pkl), so a restored sweep's relay holds the restored
    sweep's scheduler, not a copy."""

    def __init__(self, scheduler=None):
        self._scheduler = scheduler

    def get_state(self) -> dict | None:
        if self._scheduler is None:  # (tune.scheduler: none)
            return None
        with tempfile.TemporaryDirectory() as d:
            self._scheduler.save(f"{d}/scheduler.pkl")
            return {"scheduler": Path(d, "scheduler.pkl").read_bytes()}

    def set_state(self, state: dict) -> None:
        if "scheduler" in state and self._scheduler is not None:
            with tempfile.TemporaryDirectory() as d:
                Path(d, "scheduler.pkl").write_bytes(state["scheduler"])
                self._scheduler.restore(f"{d}/scheduler.pkl")

    def on_trial_start(self, iteration, trials, trial, **info):
        # a group Ray leaked since the sweep began (another job's, ended meanwhile) would hold the CPUs this
        # trial's workers wait for: freed before they ask (launch.free_leaked_placement_groups)
        launch.free_leaked_placement_groups()
        _events.on_start(trial.trial_id, trial.config.get("params", {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        _events.on_result(trial.trial_id, int(result.get(STEP, 0)), numbers)

    def on_trial_error(self, iteration, trials, trial, **info):
        line = _error_line(_saved_error(trial))
        if trial.error_file:
            line += f" (the whole error: {trial.error_file})"
        _events.on_error(trial.trial_id, line)


class _KeepsDriversCopy:
    """Tune's result.json / progress.csv writer, without losing a resumed trial's rows (ray 2.60).

    When a trial that has a checkpoint starts again (a paused trial promoted, a restored sweep's), Tune's logger
    copies the file from the storage path over the driver's own copy before appending to it
    (tune/logger/logger.py, LoggerCallback._restore_from_remote; the JSON logger at the trial's start). The
    storage path gets the driver's copies only at Tune's periodic syncs, so a trial resumed soon after it
    paused (a second later, when it trains in a process Tune kept) loses the rows since the last sync: its
    first segment, for the promoted trial of tests/test_tune.py. Here the driver's copy, where it has one, is
    kept: it holds every row this driver wrote; a restored sweep's new driver has none and takes storage's."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        local = Path(trial.local_path, file_name)
        if local.exists() and local.stat().st_size > 0:
            return
        super()._restore_from_remote(file_name, trial)


class _ResultJson(_KeepsDriversCopy, JsonLoggerCallback):
    pass


class _ProgressCsv(_KeepsDriversCopy, CSVLoggerCallback):
    pass


def _saved_error(trial) -> BaseException | None:
    """The exception a trial failed with, as Tune saved it (pickled beside the trial, then synced to storage:
    at on_trial_error only the driver's copy is there yet)."""
    if (error := trial.get_pickled_error()) is not None:
        return error
    if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
        import cloudpickle

        with open(trial.pickled_error_file, "rb") as f:
            return cloudpickle.load(f)
    return None


def _error_line(error: BaseException | None) -> str:
    """A trial's error in one line: the message of the exception the trial raised (Tune keeps it wrapped in
    Ray's RayTaskError, whose text starts with the task and a traceback)."""
    if error is None:
        return "failed (no error was saved)"
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, ray.exceptions.RayError) or not str(cause).strip():
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return one_line(lines[-1] if lines else type(error).__name__)
    return one_line(cause)

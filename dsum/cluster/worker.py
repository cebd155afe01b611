"""What each Ray Train worker runs. Its whole input is one frozen `WorkerSpec` (the job, a Ray handle to the
data, where rank 0's step metrics go, the checkpoint the job names); its whole output goes through Ray:
checkpoints to the storage path, the `TrainResult` as the last report (dsum.cluster.resume). It never reads
or writes the driver's run directory.

Ray's Train controller imports this module to unpickle the function; heavy imports (transformers, torch)
stay inside the functions, so the controller starts without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.train import Checkpoint

    from dsum.steps import StepTarget

SPEC = "spec"  # the one key of the train_loop_config Ray hands every worker


@dataclass(frozen=True)
class WorkerSpec:
    job: dict[str, Any]  # JobConfig.to_dict(): the job crosses as plain data and is validated again here
    job_file: str  # for the config errors a worker may raise
    data: Any  # a Ray ObjectRef to the driver's PreparedData
    steps: StepTarget | None = None  # rank 0 opens it: its step metrics go where it says (a tracking store)
    relay: StepTarget | None = None  # and to the driver too, where it shows progress (or logs to a local store)
    resume_from: Checkpoint | None = None  # the job's train.resume_from, in the storage path (resume.upload)
    # A Tune trial's: when its function started this segment (its start, or its resumption after a pause or a
    # restore). Rank 0 logs the segment's start-up at its first step (log_startup): a sweep's cost per trial.
    started: float | None = None


def train_loop_per_worker(config: dict[str, WorkerSpec]) -> None:
    """Ray Train's worker function: each report to Ray Train (its controller keeps the checkpoints)."""
    import time

    marks = {"train_fn": time.time()}  # start-up as rank 0 saw it (TrainResult.startup)
    import ray.train

    train(config[SPEC], marks, ray.train.report, ray.train.get_checkpoint)


def train(
    spec: WorkerSpec,
    marks: dict[str, float],
    report: Callable[..., None],
    latest: Callable[[], Checkpoint | None],
) -> None:
    """One worker's part of a run: `report(metrics, checkpoint=)` takes each checkpoint and the TrainResult,
    `latest()` is the checkpoint to resume from that Ray holds of this run. In a Train worker they are Ray
    Train's; in a Tune trial's own actor (a one-process trial, dsum.cluster.tune) Tune's."""
    import time

    import ray

    from dsum.cluster import resume, scratch
    from dsum.config import from_dict
    from dsum.train import StepMetrics, fit

    marks["worker_imported"] = time.time()
    job = from_dict(spec.job, source=spec.job_file)
    if not job.scaling.use_gpu:  # a CPU worker computes on the cores Ray reserved for it, no more
        import torch

        torch.set_num_threads(max(1, int(job.scaling.worker_cpus())))
    callbacks = [resume.report_checkpoints(report)]
    if spec.started is not None:  # a trial's segment: its worker group part counts from its function's start
        marks["fit"] = spec.started
        callbacks.append(log_startup(marks))
    callbacks += [StepMetrics(target.open()) for target in (spec.steps, spec.relay) if target is not None]
    prepared = ray.get(spec.data)  # tokenized once by the driver, from the object store
    with (
        scratch.worker_dir(job=scratch.ray_job()) as out,  # this worker's own disk, which no killed worker leaves
        resume.starting_point(latest() or spec.resume_from) as start,
    ):
        _, result = fit(job, out, prepared, resume_from=start, callbacks=callbacks, marks=marks)
        resume.report_final(result, out, start, report)


def log_startup(marks: dict[str, float]):
    """A Trainer callback: at the first optimizer step of this run segment, one entry in the Trainer's log
    history: {"trial_segment": when the trial's function started it (marks["fit"]), "startup_<part>": the
    segment's start-up in parts, dsum.train.startup from "fit", with startup_total_s}. Ray Train's report
    callback sends the log history's latest values with every checkpoint, so each report to Tune says which
    segment it came from and what that segment's start-up cost (dsum.cluster.tune: a trial's start-up apart
    from its training). A resumed segment's entry comes after the checkpoint's own."""
    import time

    from transformers import TrainerCallback

    from dsum.train import startup

    class LogStartup(TrainerCallback):
        logged = False

        def on_step_end(self, args, state, control, **kw):
            if self.logged:
                return
            self.logged = True
            marks.setdefault("first_step", time.time())  # (the mark train.fit's own callback keeps)
            parts = {f"startup_{name}": s for name, s in startup(marks, since="fit").items()}
            state.log_history.append({"trial_segment": marks["fit"], **parts, "step": state.global_step})

    return LogStartup()

"""What each Ray Train worker runs. Its whole input is a plain dict (the job, and Ray handles to the data
and the step-metrics relay); its whole output goes through Ray: checkpoints to the storage path, the
`TrainResult` as the last report. It never reads or writes the driver's run directory.

Ray's Train controller imports this module to unpickle the function; heavy imports (transformers, torch)
stay inside the functions, so the controller starts without them.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers.trainer_utils import get_last_checkpoint

    from dsum.config import from_dict
    from dsum.train import StepMetrics, fit

    job = from_dict(config["job"], source=config["job_file"])
    if not job.scaling.use_gpu:  # a CPU worker computes on the cores Ray reserved for it, no more
        import torch

        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    prepared = ray.get(config["data"])  # tokenized once by the driver, from the object store
    callbacks = [_report_checkpoints()]
    if config["steps"] is not None:  # a StepTarget: rank 0's metrics go where it says
        callbacks.append(StepMetrics(config["steps"].open()))
    # A restarted worker group resumes from the latest checkpoint Ray holds; a first start from the
    # checkpoint the job names (the driver put it in the storage path).
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    with (
        tempfile.TemporaryDirectory(prefix="dsum-worker-") as out,  # this worker's own disk
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt_dir,
    ):
        resume = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_dir else None
        _, result = fit(job, Path(out), prepared, resume_from=resume, callbacks=callbacks)
        # The last checkpoint: the final step's, or (a finished run run again) the one it resumed from.
        last = get_last_checkpoint(out)
        _report_final(result, last if last and last.endswith(f"-{result.global_step}") else resume)


def _report_final(result, checkpoint_dir: str | None) -> None:
    """The TrainResult goes to Ray with the last checkpoint: Ray's Result.metrics are the metrics reported
    with the latest checkpoint, and Result.checkpoint is that checkpoint."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from dsum.steps import STEP

    with tempfile.TemporaryDirectory(prefix="dsum-final-") as tmp:
        checkpoint = None
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, Path(tmp) / RayTrainReportCallback.CHECKPOINT_NAME)
            checkpoint = Checkpoint.from_directory(tmp)
        # STEP as in the Trainer's own reports at each checkpoint (a sweep's clock); the result's fields
        # include steps.FINAL_KEY, by which a sweep tells a finished trial
        ray.train.report(result.as_dict() | {STEP: result.global_step}, checkpoint=checkpoint)


def _report_checkpoints():
    """A Trainer callback: each checkpoint but the last goes to Ray's storage as the Trainer saves it (a
    restarted worker group resumes from it); the last goes with the TrainResult (_report_final)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class ReportCheckpoints(RayTrainReportCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step < state.max_steps:
                super().on_save(args, state, control, **kw)

    return ReportCheckpoints()

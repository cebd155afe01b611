"""Resume, end to end: where a run's checkpoints go, and where a worker group starts from.

- A Ray Train run is named in the storage path (`storage_path`): the same run name run again resumes from
  the latest checkpoint Ray holds there, as does a worker group Ray restarts after a failure
  (scaling.max_failures); `start_over` (dsum's --fresh) removes what it holds first.
- `train.resume_from` names a checkpoint on the driver's disk: the driver's preflight checked it
  (dsum.train.check_checkpoint), `upload` copies it into the storage path where every worker can read it,
  and a worker group starts from it unless Ray already holds a checkpoint of this run (`starting_point`).
- Each checkpoint the Trainer saves goes to Ray's storage as it is written (`ReportCheckpoints`); the last
  goes with the worker's `TrainResult` (`report_final`), so Ray's `Result.checkpoint` is the final weights,
  which the driver copies into the run directory without what only resuming needs (`copy_weights`).

The core knows only "resume from this Trainer checkpoint directory" (dsum.train.fit's resume_from).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dsum.config import JobConfig
from dsum.steps import STEP

if TYPE_CHECKING:
    from ray.train import Checkpoint

    from dsum.train import TrainResult

# The Trainer's checkpoint inside each Ray checkpoint directory: RayTrainReportCallback.CHECKPOINT_NAME, named
# here so the driver need not import transformers to find it (tests/test_resume.py compares the two).
CHECKPOINT_NAME = "checkpoint"
# Files of a Trainer checkpoint that only resuming needs; final/ keeps the weights and tokenizer. Under DeepSpeed
# the optimizer's and the engine's shards are in global_step<N>/, named by `latest`, with DeepSpeed's
# consolidation scripts (transformers 5.24 Trainer._save_optimizer_and_scheduler, deepspeed 0.19 engine.save_checkpoint).
RESUME_ONLY = (
    "optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin", "global_step", "latest", "zero_to_",
)  # fmt: skip


def storage_path(job: JobConfig) -> str:
    """Where Ray Train keeps checkpoints: the one place driver and workers share."""
    return job.scaling.storage_path or str(Path(job.train.output_dir).resolve() / "ray")


def filesystem(storage: str):
    """The pyarrow filesystem of a storage path, and the path's root in it."""
    from pyarrow import fs as pafs

    uri = storage if "://" in storage else Path(storage).resolve().as_posix()
    return pafs.FileSystem.from_uri(uri)


# -- on the driver


def start_over(storage: str, name: str) -> None:
    """Forget what the storage path holds of run `name` (its checkpoints): the run starts from step 0."""
    from pyarrow import fs as pafs

    fs, root = filesystem(storage)
    if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound:
        fs.delete_dir(f"{root}/{name}")


def upload(job: JobConfig, storage: str, name: str) -> Checkpoint | None:
    """train.resume_from (a checkpoint on the driver's disk) copied into the storage path, where every worker
    can read it, as a Ray Checkpoint; None where the job names none (Ray resumes from its own storage)."""
    source = job.train.resume_path
    if source is None:
        return None
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    fs, root = filesystem(storage)
    dest = f"{root}/{name}/resume-from/{CHECKPOINT_NAME}"
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(source.resolve()), dest, destination_filesystem=fs)
    return Checkpoint(path=dest.rsplit("/", 1)[0], filesystem=fs)


def copy_weights(checkpoint: Checkpoint, dest: Path) -> None:
    """The weights and tokenizer of a Ray checkpoint (the run's last) into `dest`, without the files only
    resuming needs."""
    with checkpoint.as_directory() as ckpt:
        shutil.copytree(
            Path(ckpt) / CHECKPOINT_NAME,
            dest,
            ignore=lambda _, names: [n for n in names if n.startswith(RESUME_ONLY)],
            dirs_exist_ok=True,
        )


# -- on a worker


@contextlib.contextmanager
def starting_point(checkpoint: Checkpoint | None) -> Iterator[str | None]:
    """The Trainer checkpoint directory inside a Ray checkpoint, on this worker's disk while the body runs:
    the worker's caller passes the latest checkpoint Ray holds of this run (a restarted group, the run run
    again, a trial resumed), else the one the job named (`upload`), else None (step 0). One in a bucket is
    downloaded once per node, shared by the node's workers (Ray's `as_directory`); what a killed worker leaves
    of it, dsum.cluster.scratch removes."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield str(Path(d) / CHECKPOINT_NAME)


def report_checkpoints(report: Callable[..., None]):
    """A Trainer callback: each checkpoint but the last goes to Ray's storage through `report` (ray.train's in
    a Train worker, ray.tune's in a trial's own actor) as the Trainer saves it (a restarted worker group or
    a resumed trial starts from it); the last goes with the TrainResult (`report_final`). What it reports
    is what Ray's RayTrainReportCallback.on_save does (ray 2.60, train/huggingface/transformers/
    _transformers_utils.py), which calls ray.train.report only: the log history's latest values and the
    Trainer's last checkpoint, copied under CHECKPOINT_NAME."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    class ReportCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                return
            metrics = {}
            for log in state.log_history:
                metrics.update(log)
            _report_with(report, metrics, get_last_checkpoint(args.output_dir), Path(args.output_dir))

    return ReportCheckpoints()


def _report_with(report: Callable[..., None], metrics: dict, source: str | None, scratch: Path) -> None:
    """`report(metrics)` with the Trainer checkpoint directory `source` (if any) as a Ray checkpoint: copied
    under CHECKPOINT_NAME into a directory Ray uploads to the storage path before `report` returns. The copy
    is made in the worker's `scratch` directory (dsum.cluster.scratch), which a killed worker leaves to be
    reaped (a trial stopped while Tune holds its report)."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix=".report-", dir=scratch) as tmp:
        checkpoint = None
        if source is not None:
            shutil.copytree(source, Path(tmp) / CHECKPOINT_NAME)
            checkpoint = Checkpoint.from_directory(tmp)
        report(metrics, checkpoint=checkpoint)


def report_final(result: TrainResult, output_dir: Path, started_from: str | None, report: Callable[..., None]) -> None:
    """The TrainResult goes to Ray (`report`) with the run's last checkpoint: the final step's in output_dir,
    or (a finished run run again) the one it started from. Ray's Result.metrics are the metrics reported with
    the latest checkpoint, and Result.checkpoint is that checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir))
    source = last if last and last.endswith(f"-{result.global_step}") else started_from
    # STEP as in the Trainer's own reports at each checkpoint (a sweep's clock); the result's fields
    # include steps.FINAL_KEY, by which a sweep tells a finished trial
    _report_with(report, result.as_dict() | {STEP: result.global_step}, source, output_dir)

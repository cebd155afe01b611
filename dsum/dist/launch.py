"""Ray Train on the driver: connect to a cluster, build the TorchTrainer of a job, run it, and bring back
what the workers reported (a `TrainResult`) and the weights of the last checkpoint.

Driver and workers share only the storage path (scaling.storage_path: a local directory on one machine,
s3://, gs:// or a shared volume on a cluster). The job goes to the workers as a plain dict, the tokenized
data through Ray's object store, step metrics back through a relay actor (or straight to an MLflow
server), the result through `Result.metrics` and the weights through `Result.checkpoint`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from dsum import rundir
from dsum.config import JobConfig
from dsum.errors import DsumError, one_line

if TYPE_CHECKING:  # a Tune trial builds its trainer here: it never needs the training stack itself
    from dsum.train import PreparedData, TrainResult

# Files of a Trainer checkpoint that only resuming needs; final/ keeps the weights and tokenizer.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin")
StepSink = Callable[[int, dict[str, float]], None]


def connect(address: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray for this process.

    A local Ray for a sweep runs the dashboard: Ray Train frees the workers' placement group of a trial
    that Tune stops early (ASHA) through the dashboard's state API; without it the freed CPUs never come
    back and the next trials wait forever."""
    if ray.is_initialized():
        return
    # Workers get their environment from worker_runtime_env (build_trainer); the driver passes none, so
    # it also runs inside `ray job submit`, whose job already carries a runtime env.
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(include_dashboard=dashboard)


def storage_path(job: JobConfig) -> str:
    """Where Ray Train keeps checkpoints: the one place driver and workers share."""
    return job.scaling.storage_path or str(Path(job.train.output_dir).resolve() / "ray")


def build_trainer(
    job: JobConfig,
    name: str,
    data_ref: ray.ObjectRef,
    job_file: str = "<job>",
    steps: dict[str, Any] | None = None,
    resume_from=None,
    callbacks: list | None = None,
):
    """The TorchTrainer of a job, named `name` in the storage path (running it again resumes it).

    A Tune trial builds its trainer here too, adding its TuneReportCallback to `callbacks`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dsum.dist.worker import train_loop_per_worker

    s = job.scaling
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not s.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(),
            "job_file": job_file,
            "data": data_ref,
            "steps": steps,
            "resume_from": resume_from,
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(job),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.save_total_limit),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks or None,
        ),
    )


def train(
    job: JobConfig,
    run: rundir.RunDir,
    prepared: PreparedData,
    job_file: str = "<job>",
    fresh: bool = False,
    address: str | None = None,
    on_step: StepSink | None = None,
    mlflow_steps: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on Ray Train workers; the last reported checkpoint's weights become run/final.

    Step metrics: with `mlflow_steps` rank 0 sends them to that MLflow server itself; with `on_step` they
    are relayed to this process and handed to it (a store only the driver can reach).
    """
    connect(address)
    storage = storage_path(job)
    if fresh:
        _remove(storage, run.name)
    relay = _StepRelay.options(num_cpus=0).remote() if on_step and not mlflow_steps else None
    steps = {"mlflow": mlflow_steps} if mlflow_steps else ({"relay": relay} if relay else None)
    trainer = build_trainer(
        job,
        run.name,
        ray.put(prepared),
        job_file,
        steps=steps,
        resume_from=_upload_checkpoint(job, storage, run.name),
    )
    try:
        with _draining(relay, on_step):
            result = trainer.fit()
    except Exception as e:  # the workers' own error is inside; show it in one line
        raise DsumError(f"training failed: {_root_cause(e)}") from None
    if result.checkpoint is None:
        raise DsumError("training finished without a checkpoint")
    from ray.train.huggingface.transformers import RayTrainReportCallback

    with result.checkpoint.as_directory() as ckpt, rundir.staged(run.final) as partial:
        shutil.copytree(
            Path(ckpt) / RayTrainReportCallback.CHECKPOINT_NAME,
            partial,
            ignore=lambda _, names: [n for n in names if n.startswith(_RESUME_ONLY)],
            dirs_exist_ok=True,
        )
    from dsum.train import TrainResult

    return TrainResult.from_dict(result.metrics)


@ray.remote
class _StepRelay:
    """Rank 0's step metrics, held for the driver to collect (it may be on another node)."""

    def __init__(self):
        self.items: list[tuple[int, dict[str, float]]] = []

    def put(self, step: int, metrics: dict[str, float]) -> None:
        self.items.append((step, metrics))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        items, self.items = self.items, []
        return items


@contextlib.contextmanager
def _draining(relay, on_step: StepSink | None, every_s: float = 1.0):
    """While the body runs, hand what the relay holds to on_step, from a background thread."""
    if relay is None:
        yield
        return
    done = threading.Event()

    def drain() -> None:
        for step, metrics in ray.get(relay.take.remote()):
            on_step(step, metrics)

    def loop() -> None:
        while not done.wait(every_s):
            drain()

    thread = threading.Thread(target=loop, daemon=True, name="dsum-step-relay")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(ray.exceptions.RayError):
            drain()  # the last steps
        ray.kill(relay)


def _upload_checkpoint(job: JobConfig, storage: str, name: str):
    """train.resume_from (a checkpoint on the driver's disk) copied into the storage path, where every
    worker can read it, as a Ray Checkpoint; None for 'latest' (Ray resumes from its own storage)."""
    source = job.train.resume_from
    if source is None or source == "latest":
        return None
    from pyarrow import fs as pafs
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import RayTrainReportCallback

    filesystem, root = _filesystem(storage)
    dest = f"{root}/{name}/resume-from/{RayTrainReportCallback.CHECKPOINT_NAME}"
    filesystem.create_dir(dest, recursive=True)
    pafs.copy_files(str(Path(source).resolve()), dest, destination_filesystem=filesystem)
    return Checkpoint(path=dest.rsplit("/", 1)[0], filesystem=filesystem)


def _remove(storage: str, name: str) -> None:
    from pyarrow import fs as pafs

    filesystem, root = _filesystem(storage)
    if filesystem.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound:
        filesystem.delete_dir(f"{root}/{name}")


def _filesystem(storage: str):
    from pyarrow import fs as pafs

    uri = storage if "://" in storage else Path(storage).resolve().as_posix()
    return pafs.FileSystem.from_uri(uri)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = one_line(e, 100_000)
    return text[-400:]

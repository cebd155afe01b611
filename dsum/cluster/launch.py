"""Ray Train on the driver: connect to a cluster, build the TorchTrainer of a job, run it, and bring back
what the workers reported (a `TrainResult`) and the weights of the last checkpoint.

Driver and workers share only the storage path (scaling.storage_path: a local directory on one machine,
s3://, gs:// or a shared volume on a cluster). The job goes to the workers as a plain dict, the tokenized
data through Ray's object store, step metrics back through a relay actor (or straight to an MLflow
server), the result through `Result.metrics` and the weights through `Result.checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from dsum import rundir
from dsum.cluster import resume, scratch
from dsum.config import JobConfig, share_cpus
from dsum.errors import DsumError, one_line
from dsum.steps import OnDriver, StepTarget

if TYPE_CHECKING:  # a Tune trial builds its trainer here: it never needs the training stack itself
    from dsum.train import PreparedData, TrainResult


def connect(address: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray for this process.

    A local Ray for a sweep runs the dashboard: Ray Train frees the workers' placement group of a trial
    that Tune stops early (ASHA) through the dashboard's state API; without it the freed CPUs never come
    back and the next trials wait forever."""
    # Workers get their environment from worker_runtime_env (build_trainer); the driver passes none, so
    # it also runs inside `ray job submit`, whose job already carries a runtime env.
    target = address or os.environ.get("RAY_ADDRESS")
    what = "--address" if address else "RAY_ADDRESS"
    if target:
        _probe(target, what)  # the address given is checked, even where this process is a driver already
    if ray.is_initialized():
        free_leaked_placement_groups()
        return
    # The terminal shows dsum's progress and results: what the workers and Ray's own actors print (progress
    # bars, Ray Train's notices, its placement-group cleaner asking every second for a state API that a local
    # Ray without the dashboard lacks) stays in Ray's log files, whose place is said once.
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    global _started_here
    if target:
        try:
            context = ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DsumError(f"{what} {target}: {one_line(e)}") from None
    else:
        context = ray.init(include_dashboard=dashboard, **quiet)
    global _state_api
    _started_here, _state_api = not target, bool(target) or dashboard
    where = f"the cluster at {target}; its nodes keep" if target else "started on this machine; it keeps"
    print(f"ray: {where} the workers' logs in {context.address_info['session_dir']}/logs", file=sys.stderr)
    if target:
        free_leaked_placement_groups()


_started_here = False  # this process started the Ray it is connected to (connect, with no address)
_state_api = True  # the Ray it is connected to answers Ray's state API (a dashboard runs; assumed on a cluster)


def reap_scratch() -> None:
    """The scratch directories of the workers Ray killed, removed from every node (dsum.cluster.scratch): on a
    Ray this process started, its one node is this machine, whose temp dir its workers share."""
    scratch.reap_nodes(local=_started_here)


def resolve_cpus(job: JobConfig, sweep: bool = False) -> JobConfig:
    """The job with scaling.cpus_per_worker as a number (ScalingConfig.worker_cpus): `auto` takes the CPUs of
    a Ray this process started on its own machine, for a run, not for a sweep's trials (they share the
    machine); on a cluster it joined, 1. Call it once connected."""
    s = job.scaling
    if s.cpus_per_worker != "auto":
        return job
    machine = ray.cluster_resources().get("CPU") if _started_here and not sweep else None
    return job.model_copy(update={"scaling": s.model_copy(update={"cpus_per_worker": s.worker_cpus(machine)})})


def eval_cpus(job: JobConfig) -> float:
    """CPUs per evaluation worker (eval.cpus_per_worker as a number), as resolve_cpus decides for training's.
    Call it once connected."""
    machine = ray.cluster_resources().get("CPU") if _started_here else None
    return share_cpus(job.eval.cpus_per_worker, job.eval.workers, machine)


def eval_workers(job: JobConfig, shape: dict[str, float]) -> int:
    """How many evaluation workers of `shape` to start: eval.workers, or as many as the cluster holds when
    that is fewer and no autoscaler may add nodes (said in one line); none fitting is a one-line error."""
    wanted = job.eval.workers
    fit = _fitting(shape)
    if fit >= wanted or _autoscaler_running():
        return wanted
    fields = "eval.workers / eval.cpus_per_worker" + (" / scaling.use_gpu" if "GPU" in shape else "")
    have = _describe({k: ray.cluster_resources().get(k, 0.0) for k in shape})
    if fit == 0:
        raise DsumError(f"{fields}: an evaluation worker of {_describe(shape)} can never fit: the cluster has "
                        f"{have} in all and no autoscaler to add nodes")  # fmt: skip
    print(f"dsum: evaluating with {_workers(fit)} of {_describe(shape)} each: the cluster holds no more "
          f"({have} in all; eval.workers={wanted})", file=sys.stderr, flush=True)  # fmt: skip
    return fit


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""An HTTP/2 client's connection preface and an empty SETTINGS frame (RFC 9113 §3.4): a gRPC server such
as Ray's GCS answers with its own SETTINGS frame (frame type 0x4, the fourth byte)."""


def _probe(address: str, what: str, timeout_s: float = 5.0) -> None:
    """Ray retries an address for minutes when nothing answers there, and as long when something that is
    not its GCS answers (the dashboard's port, another service). Both are known in seconds: connect, greet
    the server as gRPC does, and look at the first bytes it sends back. 'auto' and ray:// client addresses
    are left to Ray; so is a cluster with TLS (RAY_USE_TLS), whose GCS expects a TLS handshake first."""
    if address.startswith(("http://", "https://")):
        raise DsumError(
            f"{what} {address}: that is a dashboard URL (for `ray job submit --address`); give the cluster's GCS "
            "address, HOST:PORT (port 6379 unless `ray start --head --port` said otherwise)"
        )
    if address == "auto" or "://" in address or os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
        return
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "6379")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(_HTTP2_PREFACE)
            answer = _first_bytes(conn)
    except (OSError, ValueError) as e:
        reason = _os_reason(e) if isinstance(e, OSError) else str(e)
        raise DsumError(
            f"{what} {address}: no Ray cluster answers there ({reason}); start one (ray start --head) or fix the address"
        ) from None
    if len(answer) >= 4 and answer[3] == 0x04:
        return  # a gRPC server: Ray's GCS
    if answer.startswith(b"HTTP/") or answer.lstrip()[:9].lower() in (b"<!doctype", b"<html>"):
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") if answer.startswith(b"HTTP/") else "an HTML page"
        found = f"an HTTP server answers there ({status}), not Ray's GCS (Ray's dashboard, at 8265 by default, is one)"
    elif answer:
        found = f"something that is not Ray's GCS answers there (it sent {answer[:24]!r})"
    else:
        found = f"a service there took the connection but did not answer in {timeout_s:g} s (Ray's GCS answers at once)"
    raise DsumError(
        f"{what} {address}: {found}; give the cluster's GCS address, HOST:PORT, port 6379 unless "
        "`ray start --head --port` said otherwise (`ray status` on the head prints it)"
    )


def _first_bytes(conn: socket.socket) -> bytes:
    """What the server sends first, up to 64 bytes (empty when it sends nothing in time, or hangs up)."""
    try:
        return conn.recv(64)
    except (TimeoutError, ConnectionResetError):
        return b""


_STORAGE_PROBE = """
import sys
from pyarrow import fs
try:
    filesystem, root = fs.FileSystem.from_uri(sys.argv[1])
    filesystem.get_file_info(root)
except Exception as e:  # pyarrow raises OSError, ValueError or ArrowException, by filesystem
    print(e)
    sys.exit(1)
"""


def check_storage(job: JobConfig, timeout_s: float = 10.0) -> None:
    """The storage path answers: a bucket the driver can't reach (no network, no credentials, a wrong
    endpoint) is one line now, before anything starts, instead of Ray Train's controller failing with a
    stack trace later. A local path is checked with the run directory (it is created when used).

    The storage libraries retry for minutes, and pyarrow's S3 client holds the interpreter at exit until a
    request in flight ends, so the look runs in a child process that is killed after `timeout_s`."""
    storage = resume.storage_path(job)
    if "://" not in storage or storage.startswith("file://"):
        return
    try:
        look = subprocess.run([sys.executable, "-c", _STORAGE_PROBE, storage], capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise DsumError(
            f"scaling.storage_path: {storage}: no answer in {timeout_s:g} s (network, endpoint or credentials?); "
            "the driver and every worker must reach it"
        ) from None
    if look.returncode != 0:
        raise DsumError(f"scaling.storage_path: {storage}: can't be reached: {_first_line(look.stdout or look.stderr)}")


def _first_line(text: str) -> str:
    """The message of a storage library's error without the stack trace some of them put inside it."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    lines = [line for line in lines if not line.startswith(('File "', "Traceback"))]
    return one_line(" ".join(lines[:2]) if lines else text)


def check_fits(job: JobConfig) -> None:
    """A job the cluster can never hold fails now, naming the scaling fields and what the cluster has.
    Where an autoscaler runs (it may add nodes), the job waits, and dsum says what for (here, then every
    so often while it waits: `_capacity`)."""
    s = job.scaling
    fit = workers_that_fit(job)
    if fit >= s.num_workers:
        return
    need = worker_shape(job)
    shape = _describe(need)
    if _autoscaler_running():
        _say_waiting(job, fit, "waiting for the autoscaler")
        return
    cluster = ray.cluster_resources()
    have = {k: cluster.get(k, 0.0) for k in need}
    fields = ["scaling.num_workers", "scaling.cpus_per_worker"]
    fields += ["scaling.use_gpu"] if s.use_gpu else []
    fields += ["scaling.resources_per_worker"] if s.resources_per_worker else []
    strategy = f", placement {s.placement_strategy}" if s.placement_strategy.startswith("STRICT") else ""
    raise DsumError(
        f"{' / '.join(fields)}: {_workers(s.num_workers)} of {shape} each{strategy} can never fit: the cluster "
        f"has {_describe(have)} in all ({_workers(fit)} at most) and no autoscaler to add nodes"
    )


def _say_waiting(job: JobConfig, fit: int, what: str) -> None:
    shape = _describe(worker_shape(job))
    print(f"dsum: {what}: {_workers(job.scaling.num_workers)} of {shape} each; the cluster holds {fit} now",
          file=sys.stderr, flush=True)  # fmt: skip


def _workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def workers_that_fit(job: JobConfig) -> int:
    """How many of the job's workers the cluster's live nodes hold at once (each worker on one node)."""
    return _fitting(worker_shape(job), job.scaling.placement_strategy)


def _fitting(need: dict[str, float], strategy: str = "PACK") -> int:
    per_node = [
        min(int(node["Resources"].get(k, 0) // v) for k, v in need.items()) for node in ray.nodes() if node["Alive"]
    ]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    return sum(per_node)


def free_leaked_placement_groups() -> list[str]:
    """Remove the placement groups that Ray's own lifetime rule says are gone but Ray 2.60 keeps, and say so.

    A placement group that is not detached lives until both its creator job and its creator actor (none: the
    driver) are dead; GCS then removes it. GCS learns that the job died once, when it ends, and marks the
    groups it holds then (gcs_placement_group_manager.cc, CleanPlacementGroupIfNeededWhenJobDead). A group
    that an actor of the job registers after that moment is never marked: when the actor dies too, the group
    stays CREATED for the cluster's life, holding its CPUs. A killed `dsum tune` driver leaves one that way
    (a trial's Train controller, not yet killed by the job's end, asks for its worker group): the resumed
    sweep's last trial then waits forever for that CPU. So before a run or sweep starts, dsum removes every
    group whose creator job has ended and whose creator actor is dead, and nothing else: a live job's groups,
    detached ones and those of a live actor (a detached actor's children) stay.

    Private, as in _autoscaler_running: no public API shows a group's creator flags (`ray.util.state` lacks
    them and needs the dashboard). Checked with Ray 2.60 (ray/_private/state.py, gcs.proto's
    PlacementGroupTableData); tests/test_ray_cluster.py reproduces the leak and fails if this breaks."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ended = {job["JobID"] for job in state.job_table() if job["IsDead"]}
    freed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(raw)
        if (
            group.state == PlacementGroupTableData.REMOVED
            or group.is_detached
            or group.creator_job_dead  # GCS knows: it removes the group itself once its actor is dead
            or not group.creator_actor_dead
            or group.creator_job_id.hex() not in ended
        ):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
        held: dict[str, float] = {}
        for bundle in group.bundles:
            for name, amount in bundle.unit_resources.items():
                held[name] = held.get(name, 0.0) + amount
        freed.append(group.placement_group_id.hex())
        print(
            f"ray: freed placement group {freed[-1]} ({_describe(held)}), left by job {group.creator_job_id.hex()} "
            "that has ended (Ray 2.60 keeps a group that a job's actor creates as the job ends)",
            file=sys.stderr,
        )
    return freed


def worker_shape(job: JobConfig) -> dict[str, float]:
    s = job.scaling
    return {"CPU": s.worker_cpus()} | ({"GPU": 1.0} if s.use_gpu else {}) | dict(s.resources_per_worker)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _autoscaler_running() -> bool:
    """Whether something may add nodes. Every Ray head runs a monitor that publishes its status in the GCS;
    on a cluster without an autoscaler (a local Ray, `ray start` by hand) its provider is read-only and
    names each node's type after the node ('node_<id>'). A cluster launcher's or KubeRay's autoscaler names
    node types from its config. No status at all: unknown, so dsum waits rather than refuse."""
    import json

    # Private (as in free_leaked_placement_groups): no public API reads the autoscaler's status (`ray status` reads this
    # same key). Checked with Ray 2.60 (ray/_private/ray_constants.py, ray/experimental/internal_kv.py);
    # tests/test_ray_cluster.py (test_a_job_the_cluster_can_never_hold_fails_at_once, on a cluster without an
    # autoscaler) fails if it breaks: no status means "may scale", and dsum would wait instead.
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return True
    report = json.loads(raw).get("autoscaler_report") or {}
    types = (report.get("node_type_mapping") or {}).items()
    read_only = all(kind == f"node_{node}" for node, kind in types)
    return not read_only or bool(report.get("pending_nodes") or report.get("pending_launches"))


def build_trainer(
    job: JobConfig,
    name: str,
    data_ref: ray.ObjectRef,
    job_file: str = "<job>",
    steps: StepTarget | None = None,
    resume_from=None,
    callbacks: list | None = None,
    relay: StepTarget | None = None,
    started: float | None = None,
):
    """The TorchTrainer of a job, named `name` in the storage path (running it again resumes it).

    A Tune trial builds its trainer here too, adding its TuneReportCallback to `callbacks`, and when its
    function started (`started`: its workers log the start-up of each of its segments, WorkerSpec).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from dsum.cluster.worker import SPEC, WorkerSpec, train_loop_per_worker

    s = job.scaling
    # Ray Train's preemption watcher (one more actor per run) polls for node drains only to log them: a dsum
    # run reads no preemption notice; a lost node is a failed worker group, restarted from the last checkpoint
    # (scaling.max_failures). Ray Train hands this variable on from the process that runs fit() to its
    # controller. Set it to 1 to have the watcher anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The controller collects the workers' reports (evaluations, checkpoints, the last one) when it polls them:
    # every 2 s by default. A sweep's scheduler then decides up to 2 s late while the trial trains on, and
    # each Train run's end is seen up to 2 s late; asha-promote's 8-trial sweep (bench P5) took 183.5 s at 2 s
    # and 133.6 s at 0.25 s, the same trials and steps (2026-12-01). A poll is one small call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={SPEC: WorkerSpec(job.to_dict(), job_file, data_ref, steps, relay, resume_from, started)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.worker_cpus(), **s.resources_per_worker},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=resume.storage_path(job),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.save_total_limit),
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": worker_env(job)},
            callbacks=callbacks or None,
        ),
    )


def worker_env(job: JobConfig) -> dict[str, str]:
    """The environment a worker trains in (a Train worker's runtime env; a trial that trains in its own actor
    sets it there)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not job.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU workers
    return env


@functools.cache
def _trainer_class():
    """TorchTrainer without its Ray Datasets callback, which starts a DatasetManager actor per run (a process,
    2 CPU-seconds here) even when, as in every dsum run, no Ray Dataset is given: the data goes to the workers
    through the object store. Without the callback the workers' dataset shard provider is None, which
    RayTrainWorker.init_train_context takes as its default (ray 2.60,
    ray/train/v2/_internal/execution/worker_group/worker.py); tests/test_ray.py checks no such actor starts.
    On a Ray this process started without the dashboard, also without its placement-group cleaner: an actor
    that asks Ray's state API every second whether the run's controller lives, to free the workers' placement
    group if it died (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py); that API needs
    the dashboard, so there it only fails, every second, for the whole run (a warning in its log each time,
    1% of a core here), and that Ray ends with this process anyway. tests/test_train.py checks it is gone."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = () if self.datasets else (DatasetsCallback,)
            unused += () if _state_api else (PlacementGroupCleanerCallback,)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return Trainer


def train(
    job: JobConfig,
    run: rundir.RunDir,
    prepared: PreparedData,
    job_file: str = "<job>",
    fresh: bool = False,
    address: str | None = None,
    steps: StepTarget | OnDriver | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    marks: dict[str, float] | None = None,
) -> TrainResult:
    """Train on Ray Train workers; the last reported checkpoint's weights become run/final. `marks` gets the
    time Ray Train was handed the run ("fit").

    Step metrics: a StepTarget goes to the workers, where rank 0 opens it (e.g. an MLflow server it can
    reach); OnDriver's are relayed to this process and handed to its `log` (a store only the driver can reach),
    and so are they all to `progress` (what the terminal shows while the workers train).
    """
    connect(address)
    storage = resume.storage_path(job)
    if fresh:
        resume.start_over(storage, run.name)
    on_driver = [f for f in (steps.log if isinstance(steps, OnDriver) else None, progress) if f is not None]
    relay = new_relay() if on_driver else None
    trainer = build_trainer(
        job,
        run.name,
        ray.put(prepared.for_workers()),
        job_file,
        steps=None if isinstance(steps, OnDriver) else steps,
        relay=RelaySink(relay) if relay is not None else None,
        resume_from=resume.upload(job, storage, run.name),
    )

    def hand_over(step: int, metrics: dict[str, float]) -> None:
        for f in on_driver:
            f(step, metrics)

    try:
        with _capacity(job), _draining(relay, hand_over):
            if marks is not None:
                marks["fit"] = time.time()
            result = trainer.fit()
    except SystemExit:  # Ctrl-C: Ray Train's SIGINT handler aborted the run (workers stopped), then exited
        raise KeyboardInterrupt from None
    except Exception as e:  # the workers' own error is inside; show it in one line
        if _out_of_space(e, storage):
            raise DsumError(
                f"training failed: a checkpoint could not be written to the storage path {storage} (No space left "
                "on device); the last complete checkpoint is kept there: free space and run the same command again "
                "to resume from it"
            ) from None
        raise DsumError(f"training failed: {_root_cause(e)}") from None
    finally:  # what workers Ray killed (a failure, Ctrl-C) left on their nodes' disks
        reap_scratch()
    if result.checkpoint is None:
        raise DsumError("training finished without a checkpoint")
    try:
        with rundir.staged(run.final) as partial:
            resume.copy_weights(result.checkpoint, partial)
    except OSError as e:  # a full disk, most likely: final/ stays as it was, the checkpoint stays in storage
        raise DsumError(
            f"{run.final}: can't write the trained weights ({_os_reason(e)}); the last checkpoint is kept in "
            f"{storage}: free space and run the same command again to finish from it"
        ) from None
    from dsum.train import TrainResult

    return TrainResult.from_dict(result.metrics)


@contextlib.contextmanager
def _capacity(job: JobConfig, every_s: float | None = None, poll_s: float = 2.0):
    """The cluster's room for the job's workers, before Ray Train starts. Where it can't hold them yet (an
    autoscaler runs: check_fits refused the job otherwise), ask the autoscaler for them (request_resources: a
    placement group that can't be placed is not always seen as demand) and wait here, saying every
    `every_s` seconds (DSUM_WAIT_NOTICE_S, default 60) what for; a Ctrl-C while waiting stops at once, as
    nothing has started. The request is withdrawn when the run ends."""
    n = job.scaling.num_workers
    if workers_that_fit(job) >= n:
        yield
        return
    from ray.autoscaler.sdk import request_resources

    every_s = every_s or float(os.environ.get("DSUM_WAIT_NOTICE_S", "60"))
    request_resources(bundles=[worker_shape(job)] * n)
    try:
        start = last = time.monotonic()
        try:
            while (fit := workers_that_fit(job)) < n:
                time.sleep(poll_s)
                if time.monotonic() - last >= every_s:
                    last, waited = time.monotonic(), int(time.monotonic() - start)
                    _say_waiting(job, fit, f"still waiting for the autoscaler ({waited // 60} min {waited % 60} s)")
        except KeyboardInterrupt:
            raise KeyboardInterrupt("interrupted while waiting for the autoscaler, before training started") from None
        yield
    finally:
        with contextlib.suppress(Exception):
            request_resources(bundles=[])


@dataclass(frozen=True)
class RelaySink:
    """Rank 0's step metrics on their way to the driver (its progress, OnDriver's log): rank 0 puts them in
    the relay actor, fire and forget (never blocking a step); the driver takes them from there (_draining).
    Its own StepTarget: an actor handle crosses to the worker as it is, so opening it is itself (and tells the
    relay that the worker's train function has begun)."""

    relay: Any  # a _StepRelay actor handle

    def open(self) -> RelaySink:
        self.relay.started.remote()  # (the worker's train function has begun: a trial's timeout counts from here)
        return self

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.relay.put.remote(step, metrics)

    def close(self) -> None:
        pass


@ray.remote
class _StepRelay:
    """Rank 0's step metrics, held for the driver to collect (it may be on another node)."""

    def __init__(self):
        self.items: list[tuple[int, dict[str, float]]] = []
        self.began = False

    def started(self) -> None:
        self.began = True

    def put(self, step: int, metrics: dict[str, float]) -> None:
        self.items.append((step, metrics))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        items, self.items = self.items, []
        return items

    def signs(self) -> tuple[bool, bool]:
        """(whether rank 0's train function has begun, whether it relayed a metric since the last call)."""
        return self.began, bool(self.take())


@contextlib.contextmanager
def _draining(relay, on_step: Callable[[int, dict[str, float]], None] | None, every_s: float = 1.0):
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


class NoReport(DsumError):
    """A Train run whose rank 0 reported nothing for longer than its limit (a hang, a deadlock)."""


def new_relay():
    """A relay actor for rank 0's step metrics (build_trainer's `relay` takes it as RelaySink(relay))."""
    return _StepRelay.options(num_cpus=0).remote()


def fit_reporting(trainer, relay, timeout_s: float, poll_s: float = 1.0):
    """`trainer.fit()`, stopped with NoReport when rank 0 relays no metric (`relay`: what build_trainer's
    RelaySink(relay) puts to) for `timeout_s` seconds, from the start of its train function (its data, model
    and first steps; the worker group's own start has Ray Train's limit, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    or its last metric. The fit runs in a thread of its own: this one watches, and raising here ends the caller
    (a Tune trial, whose process Tune then ends, and with it the Train run that process owns: its controller,
    hence its workers)."""
    done: dict[str, Any] = {}

    def fit() -> None:
        try:
            done["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread
            done["error"] = e

    thread = threading.Thread(target=fit, daemon=True, name="dsum-fit")
    thread.start()
    # when the clock last started: the train function's start, then each metric; until the function starts, the
    # trial's start plus what Ray Train allows the worker group (a worker stuck before its function counts too)
    last = time.monotonic() + float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    started = False
    try:
        while thread.is_alive():
            thread.join(poll_s)
            began, relayed = ray.get(relay.signs.remote())
            if relayed or (began and not started):
                last, started = time.monotonic(), began
            elif thread.is_alive() and time.monotonic() - last > timeout_s:
                raise NoReport(f"its workers reported no metric for {timeout_s:g} s (tune.trial_timeout_s); stopped")
    finally:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(relay)
    if "error" in done:
        raise done["error"]
    return done["result"]


def _os_reason(e: OSError) -> str:
    """'No space left on device', also from shutil.Error, which lists an error per file it could not copy."""
    if e.strerror:
        return e.strerror
    found = re.search(r"\[Errno \d+\] ([^:'\"]+)", str(e))
    return found.group(1).strip() if found else one_line(e)


def _out_of_space(e: BaseException, storage: str) -> bool:
    """Whether a failed run ran out of disk in the storage path: ENOSPC anywhere in the error chain (a
    worker's checkpoint upload), or a local storage path left with almost nothing free (Ray Train's
    controller, which writes there too, may die of it with an error that doesn't say so)."""
    seen: BaseException | None = e
    while seen is not None:
        if "No space left on device" in str(seen) or "[Errno 28]" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if "://" in storage:
        return False
    try:
        return shutil.disk_usage(storage).free < 1 << 20
    except OSError:
        return False


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = one_line(e, 100_000)
    return text[-400:]

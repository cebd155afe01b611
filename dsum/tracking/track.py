"""MLflow tracking: one MLflow run per dsum run, opened by the driver.

The driver opens the run (and fails before training when the store can't be reached), logs the
flattened config and the provenance tags. Step metrics are logged live: by the rank-0 worker itself when
the store is a server (from a background thread, so a lost server never stalls training), else by the
driver, to which the Ray layer relays them (a local store is on the driver's disk only). At the end the
driver logs evaluation metrics, artifacts and the summarizer model, then registers it
(dsum.tracking.registry). A run that fails is marked FAILED with its error; a run whose server is lost
keeps training, then ends with a one-line error: its MLflow run is left unfinished and nothing is registered.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsum import rundir
from dsum.config import JobConfig
from dsum.errors import DsumError, one_line
from dsum.steps import OnDriver
from dsum.sweep import Trial

STATE_TAG = "dsum.state"  # training → finished | failed; a run lost mid-way stays at "training"


def resolve_uri(explicit: str | None = None) -> str:
    """The tracking store: explicit, else MLFLOW_TRACKING_URI, else a sqlite file in the working dir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client_env(retries: int, timeout_s: int) -> dict[str, str]:
    """How hard MLflow's HTTP client tries (it reads these per request); and no download progress bars of its
    own on the terminal (a promotion's scores, a registered model: dsum says what it does)."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def connect(uri: str, retries: int = 3, timeout_s: int = 10, what: str = "tracking.tracking_uri"):
    """A client that has answered one request, or a one-line DsumError naming the store."""
    from mlflow import MlflowClient

    os.environ.update(client_env(retries, timeout_s))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise DsumError(f"{what}: cannot reach MLflow at {uri} ({one_line(e)})") from None
    return client


def check_reachable(job: JobConfig) -> None:
    """A tracking server that doesn't answer stops the job before anything is written (a local store is
    created on first use, so there is nothing to check)."""
    t = job.tracking
    uri = resolve_uri(t.tracking_uri)
    if t.enabled and uri.startswith(("http://", "https://")):
        connect(uri, t.retries, t.timeout_s)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"learning_rate": 0.001}} → {"train.learning_rate": "0.001"}; lists as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def provenance(job: JobConfig, splits: dict[str, Any]) -> dict[str, str]:
    tags = {
        "dsum.version": importlib.metadata.version("dsum"),
        "dsum.git_commit": _git_commit(),
        "dsum.base_model": job.model.name,
        "dsum.base_revision": job.model.revision or "unpinned",
        "dsum.job": job.name,
        "dsum.job_fingerprint": job.fingerprint(),
    }
    for split, info in splits.items():
        tags[f"dsum.data.{split}.fingerprint"] = info["fingerprint"]
    return tags


class Tracker:
    """The driver's handle on the run's MLflow run."""

    def __init__(self, job: JobConfig, run: rundir.RunDir, client, uri: str, run_id: str, experiment_id: str = ""):
        self.job, self.run, self.client, self.uri, self.run_id = job, run, client, uri, run_id
        self.experiment_id = experiment_id

    @classmethod
    def open(cls, job: JobConfig, run: rundir.RunDir, splits: dict[str, Any]) -> Tracker | None:
        """Start (or, for a resumed dsum run, continue) the MLflow run. None when tracking is off."""
        if not job.tracking.enabled:
            return None
        client, uri, run_id, experiment_id = _open_run(job, run, flatten(job.to_dict()))
        _log_batch(client, run_id, tags=provenance(job, splits) | {STATE_TAG: "training", "dsum.run_dir": str(run)})
        return cls(job, run, client, uri, run_id, experiment_id)

    def step_target(self) -> MlflowStepTarget | OnDriver:
        """How step metrics reach this run: a server, which the workers can reach, takes them from rank 0
        directly; a local store (sqlite, files) only from this process, so they are relayed here."""
        if self.uri.split("://", 1)[0] in ("http", "https", "databricks"):
            env = client_env(self.job.tracking.retries, self.job.tracking.timeout_s)
            return MlflowStepTarget(self.uri, self.run_id, env)
        return OnDriver(self.log_step)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        _log_batch(self.client, self.run_id, metrics=metrics, step=step)

    def finish(self, result) -> dict[str, Any]:
        """Log the results, artifacts and model, and register it. A store that fails here leaves the MLflow
        run unfinished with nothing registered, and stops with one line (the results are in the run dir)."""
        from dsum.tracking import registry

        try:
            _log_batch(self.client, self.run_id, metrics=result_metrics(result))
            self._log_artifacts(result.eval.report)
            with registry.using_uri(self.uri):  # the model logged, and registered, in this run's store
                model_uri = registry.log_summarizer(self.uri, self.run_id, self.run.path)
                outcome: dict[str, Any] = {
                    "run_id": self.run_id,
                    "experiment_id": self.experiment_id,
                    "tracking_uri": self.uri,
                    "model_uri": model_uri,
                }
                name = self.job.tracking.registered_model
                if name:
                    outcome |= registry.register(
                        self.client, name, model_uri, self.run_id, result.eval, self.job.tracking
                    )
            _log_batch(self.client, self.run_id, tags={STATE_TAG: "finished"})
            self.client.set_terminated(self.run_id, "FINISHED")
            return outcome
        except Exception as e:  # an MLflow, HTTP or storage error of any kind: the run can't be finished
            raise DsumError(
                f"tracking: nothing was registered and MLflow run {self.run_id} is left unfinished; the results "
                f"are in {self.run}; MLflow at {self.uri} failed at the end of the run: {one_line(e, 600)}"
            ) from None

    def fail(self, error: BaseException) -> None:
        _end_failed(self.client, self.run_id, self.uri, error)

    def _log_artifacts(self, report: str) -> None:
        run = self.run
        self.client.log_artifact(self.run_id, str(run.config))
        self.client.log_artifact(self.run_id, str(run.train_metrics))
        self.client.log_artifacts(self.run_id, str(run.final), "adapter" if self.job.method.name != "full" else "model")
        split_dir = Path(report).parent
        self.client.log_artifacts(self.run_id, str(split_dir), f"{rundir.EVAL}/{split_dir.name}")


@dataclass(frozen=True)
class MlflowStepTarget:
    """Step metrics from rank 0 straight to an MLflow server (a StepTarget: it crosses to the worker, which
    opens it), with the job's retries and timeout for MLflow's HTTP client."""

    uri: str
    run_id: str
    env: dict[str, str]

    def open(self) -> MlflowSteps:
        return MlflowSteps(self.uri, self.run_id, self.env)


class MlflowSteps:
    """A step-metrics sink on a worker: batches go to the MLflow server from a background thread, so a slow
    or lost server never holds up a training step. A batch that still fails after the client's retries is
    dropped with one warning; the count is reported at close()."""

    def __init__(self, uri: str, run_id: str, env: dict[str, str]):
        # MLflow's HTTP client reads its retries and timeout from the environment only, per request
        # (mlflow/environment_variables.py, 3.x): this worker's own process
        os.environ.update(env)
        self.uri, self.run_id = uri, run_id
        self.pending: queue.Queue = queue.Queue()
        self.failed = 0
        self.thread: threading.Thread | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._send, daemon=True, name="dsum-mlflow")
            self.thread.start()
        self.pending.put((step, metrics))

    def close(self) -> None:
        if self.thread is None:
            return
        self.pending.put(None)
        self.thread.join(timeout=float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 10)) * 3)
        if self.failed:
            warn(f"tracking: {self.failed} batches of step metrics were not logged to {self.uri}")

    def _send(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        while (item := self.pending.get()) is not None:
            step, metrics = item
            try:
                _log_batch(client, self.run_id, metrics=metrics, step=step)
            except Exception as e:  # any failure to send: training goes on without this batch
                if not self.failed:
                    warn(f"tracking: step {step} metrics not logged to {self.uri} ({one_line(e)}); training goes on")
                self.failed += 1


def _open_run(job: JobConfig, run: rundir.RunDir, params: dict[str, str]) -> tuple[Any, str, str, str]:
    """(client, uri, run id, experiment id) of the dsum run's MLflow run: the unfinished one that a run
    (or sweep) run again continues, else a new one with `params`. Its id goes to run/tracking.json."""
    t = job.tracking
    uri = resolve_uri(t.tracking_uri)
    client = connect(uri, t.retries, t.timeout_s)
    run_id = _previous_run(client, run, uri)
    experiment = client.get_experiment_by_name(t.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(t.experiment)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run.name).info.run_id
        _log_batch(client, run_id, params=params)
    rundir.write_json(run.tracking, {"tracking_uri": uri, "run_id": run_id})
    return client, uri, run_id, experiment_id


def _log_batch(client, run_id: str, params=None, metrics=None, tags=None, step: int = 0, synchronous: bool = True):
    """One batch (MLflow splits it into requests within the server's limits). synchronous=False: MLflow's own
    background queue sends it, and the RunOperations returned waits for it (and raises what failed)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    return client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, v[:6000]) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        synchronous=synchronous,
    )


def result_metrics(result) -> dict[str, float]:
    """Flat numbers of a run's results: tuned_rougeL, base_rougeL, delta_rougeL, delta_rougeL_ci_low, …"""
    out = {}
    for name, m in result.eval.metrics.items():
        for key, value in m.items():
            if value != value:  # NaN: nothing to log
                continue
            out[f"{key}_{name}" if key in ("base", "tuned", "delta") else f"delta_{name}_{key}"] = value
    t = result.train
    numbers = {"train_loss": t.train_loss, "eval_loss": t.eval_loss, "train_tokens_per_s": t.train_tokens_per_s}
    numbers["eval_rougeL"] = t.eval_rougeL
    numbers |= {"global_step": t.global_step, "trainable_params": t.trainable_params, "examples": result.eval.examples}
    numbers |= {f"startup_{k}": v for k, v in result.startup.items()}  # startup_total_s, startup_model_s, …
    numbers |= {f"step_ms_{k}": v for k, v in t.step_ms.items()}  # step_ms_forward, step_ms_backward, …
    return out | {k: v for k, v in numbers.items() if v is not None}


def _previous_run(client, run_dir: rundir.RunDir, uri: str) -> str | None:
    """The unfinished MLflow run of a resumed dsum run, if it is in this store."""
    from mlflow.exceptions import MlflowException

    try:
        saved = json.loads(run_dir.tracking.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("tracking_uri") != uri:
        return None
    try:
        run = client.get_run(saved["run_id"])
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # a server error is not "no such run"
            raise DsumError(f"tracking.tracking_uri: MLflow at {uri}: {one_line(e)}") from None
        return None
    if run.info.status == "FINISHED":
        return None
    if run.info.status != "RUNNING":  # a failed or killed attempt that this one continues
        client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def warn(message: str) -> None:
    print(f"dsum: warning: {message}", file=sys.stderr, flush=True)


class SweepTracker:
    """A sweep in MLflow: one parent run (the space, the scheduler, then the ranked table and the best
    job), and a nested run per trial (its values, its metric at each evaluation, its outcome). The
    driver logs everything (Tune's events reach it), so a local store works as a server does. A sweep run
    again continues its parent run and finds the nested runs of the trials it already has."""

    def __init__(self, client, uri: str, parent_id: str, experiment_id: str):
        self.client, self.uri, self.parent_id, self.experiment_id = client, uri, parent_id, experiment_id
        self.trials: dict[str, str] = {}
        self.sending: list = []  # MLflow's RunOperations of the metrics still being sent

    @classmethod
    def open(cls, job: JobConfig, run: rundir.RunDir, splits: dict[str, Any]) -> SweepTracker | None:
        if not job.tracking.enabled:
            return None
        params = flatten({k: v for k, v in job.to_dict().items() if k != "tune"})
        params |= {
            f"tune.{k}": json.dumps(v) if isinstance(v, dict) else str(v) for k, v in job.tune.model_dump().items()
        }
        client, uri, parent_id, experiment_id = _open_run(job, run, params)
        tags = provenance(job, splits) | {STATE_TAG: "sweeping", "dsum.sweep": "true", "dsum.run_dir": str(run)}
        _log_batch(client, parent_id, tags=tags)
        tracker = cls(client, uri, parent_id, experiment_id)
        for found in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
            tracker.trials[found.data.tags.get("dsum.trial_id", "")] = found.info.run_id
        return tracker

    def trial_started(self, trial_id: str, params: dict[str, Any]) -> None:
        if trial_id in self.trials:  # a trial that starts again after a restore: same nested run
            self.client.update_run(self.trials[trial_id], status="RUNNING")
            return
        tags = {"mlflow.parentRunId": self.parent_id, "dsum.trial_id": trial_id}
        nested = self.client.create_run(self.experiment_id, run_name=trial_id, tags=tags).info.run_id
        _log_batch(self.client, nested, params={k: str(v) for k, v in params.items()})
        self.trials[trial_id] = nested

    def trial_result(self, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        """Sent in the background: this runs in Tune's event loop, which a slow server would hold up (every
        trial's next report waits for it)."""
        if trial_id in self.trials:
            keep = {k: v for k, v in metrics.items() if k in ("eval_loss", "eval_rougeL", "loss", "train_loss")}
            self.sending.append(
                _log_batch(self.client, self.trials[trial_id], metrics=keep, step=step, synchronous=False)
            )

    def _sent(self) -> None:
        """Every trial's metrics are on the server (or what failed is raised)."""
        sending, self.sending = self.sending, []
        for operations in sending:
            operations.wait()

    def finish(self, trials: list[Trial], metric: str, table: str, best_yaml: str) -> dict[str, Any]:
        """Each trial's outcome on its nested run; the table and the best job on the parent."""
        self._sent()
        for trial in trials:
            nested = self.trials.get(trial.trial_id)
            if nested is None:
                continue
            tags = {"dsum.stopped_early": str(trial.stopped_early).lower(), "dsum.steps": str(trial.step)}
            if trial.error:
                tags["dsum.error"] = trial.error
            # (its metric at each report is there already, at its step: trial_result); what the trial cost
            cost = {"segments": trial.segments, "startup_s": trial.startup_s, "train_s": trial.train_s}
            cost |= {f"startup_{part}": s for part, s in trial.startup_parts.items()}
            metrics = {k: v for k, v in cost.items() if v is not None and trial.segments}
            _log_batch(self.client, nested, metrics=metrics, tags=tags)
            self.client.set_terminated(nested, "FAILED" if trial.error else "FINISHED")
        self.client.log_text(self.parent_id, table + "\n", "sweep/table.txt")
        rows = [t.as_dict(metric) for t in trials]
        self.client.log_text(self.parent_id, json.dumps(rows, indent=2), "sweep/trials.json")
        self.client.log_text(self.parent_id, best_yaml, "sweep/best.yaml")
        best = trials[0]
        metrics = {f"best_{metric}": best.value} if best.value is not None else {}
        _log_batch(
            self.client,
            self.parent_id,
            metrics=metrics,
            tags={STATE_TAG: "finished", "dsum.best_trial": best.trial_id},
        )
        self.client.set_terminated(self.parent_id, "FINISHED")
        return {"run_id": self.parent_id, "tracking_uri": self.uri, "trial_runs": dict(self.trials)}

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(Exception):  # what was sent before the failure is kept; the failure matters more
            self._sent()
        _end_failed(self.client, self.parent_id, self.uri, error)


def _end_failed(client, run_id: str, uri: str, error: BaseException) -> None:
    """Mark an MLflow run FAILED with its error, or KILLED when the user stopped it (Ctrl-C); best effort:
    the error itself is what matters."""
    killed = isinstance(error, KeyboardInterrupt)
    try:
        tags = {STATE_TAG: "killed" if killed else "failed", "dsum.error": one_line(error, 4000) or "interrupted"}
        _log_batch(client, run_id, tags=tags)
        client.set_terminated(run_id, "KILLED" if killed else "FAILED")
    except Exception as e:
        warn(
            f"tracking: could not mark run {run_id} {'killed' if killed else 'failed'} in MLflow at {uri} ({one_line(e)})"
        )

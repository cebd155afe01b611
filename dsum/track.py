"""MLflow tracking: one MLflow run per dsum run, opened by the driver.

The driver opens the run (and fails before training when the store can't be reached), logs the
flattened config and the provenance tags; the rank-0 worker logs step metrics live, from a background
thread so a lost server never stalls training; the driver logs evaluation metrics, artifacts and the
summarizer model at the end, then registers it (dsum.registry). A run that fails is marked FAILED with its
error; a run whose server is lost keeps going, warns, and is left unfinished (never registered).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dsum.config import DsumError, JobConfig, one_line

TRACKING_FILE = "tracking.json"  # in the run directory: the MLflow run a resumed dsum run continues
STATE_TAG = "dsum.state"  # training → finished | failed; a run lost mid-way stays at "training"


def resolve_uri(explicit: str | None = None) -> str:
    """The tracking store: explicit, else MLFLOW_TRACKING_URI, else a sqlite file in the working dir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client_env(retries: int, timeout_s: int) -> dict[str, str]:
    """How hard MLflow's HTTP client tries (it reads these per request)."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
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

    def __init__(self, job: JobConfig, run_dir: Path, client, uri: str, run_id: str):
        self.job, self.run_dir, self.client, self.uri, self.run_id = job, run_dir, client, uri, run_id

    @classmethod
    def open(cls, job: JobConfig, run_dir: Path, splits: dict[str, Any]) -> Tracker | None:
        """Start (or, for a resumed dsum run, continue) the MLflow run. None when tracking is off."""
        t = job.tracking
        if not t.enabled:
            return None
        uri = resolve_uri(t.tracking_uri)
        client = connect(uri, t.retries, t.timeout_s)
        run_id = _previous_run(client, run_dir, uri)
        if run_id is None:
            experiment = client.get_experiment_by_name(t.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(t.experiment)
            run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            _log_batch(client, run_id, params=flatten(job.to_dict()))
        (run_dir / TRACKING_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
        _log_batch(client, run_id, tags=provenance(job, splits) | {STATE_TAG: "training", "dsum.run_dir": str(run_dir)})
        return cls(job, run_dir, client, uri, run_id)

    def worker_config(self) -> dict[str, Any]:
        """What the rank-0 worker needs to log step metrics to this run."""
        return {
            "uri": self.uri,
            "run_id": self.run_id,
            **client_env(self.job.tracking.retries, self.job.tracking.timeout_s),
        }

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Log the results, artifacts and model; register it. Never raises: a lost server is a warning."""
        from dsum import registry

        try:
            _log_batch(self.client, self.run_id, metrics=_result_metrics(results))
            self._log_artifacts(results)
            model_uri = registry.log_summarizer(self.uri, self.run_id, self.run_dir)
            outcome: dict[str, Any] = {"run_id": self.run_id, "tracking_uri": self.uri, "model_uri": model_uri}
            name = self.job.tracking.registered_model
            if name:
                outcome |= registry.register(self.client, name, model_uri, self.run_id, results)
            _log_batch(self.client, self.run_id, tags={STATE_TAG: "finished"})
            self.client.set_terminated(self.run_id, "FINISHED")
            return outcome
        except Exception as e:
            warn(
                f"tracking: MLflow at {self.uri} failed at the end of the run ({one_line(e)}); run {self.run_id} is "
                f"left unfinished there and nothing was registered; the results are in {self.run_dir}"
            )
            return {"run_id": self.run_id, "tracking_uri": self.uri, "error": one_line(e)}

    def fail(self, error: BaseException) -> None:
        """Mark the MLflow run FAILED with its error (best effort: the error itself is what matters)."""
        try:
            tags = {STATE_TAG: "failed", "dsum.error": one_line(error, 4000)}
            _log_batch(self.client, self.run_id, tags=tags)
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as e:
            warn(f"tracking: could not mark run {self.run_id} failed in MLflow at {self.uri} ({one_line(e)})")

    def _log_artifacts(self, results: dict[str, Any]) -> None:
        from dsum.train import FINAL

        run = self.run_dir
        log = self.client.log_artifact
        log(self.run_id, str(run / "config.yaml"))
        log(self.run_id, str(run / "train_metrics.json"))
        self.client.log_artifacts(
            self.run_id, str(run / FINAL), "adapter" if self.job.method.name != "full" else "model"
        )
        split_dir = Path(results["report"]).parent
        self.client.log_artifacts(self.run_id, str(split_dir), f"eval/{split_dir.name}")


class StepLogger(TrainerCallback):
    """Rank 0's step metrics (loss, learning rate, grad norm, tokens seen) to MLflow, live.

    Sending happens on a background thread: a slow or lost server never holds up a training step. A batch
    that still fails after the client's retries is dropped with one warning; the count is reported at the end.
    """

    KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss", "num_input_tokens_seen", "train_tokens_per_second")

    def __init__(self, uri: str, run_id: str, **env: str):
        os.environ.update(env)
        self.uri, self.run_id = uri, run_id
        self.pending: queue.Queue = queue.Queue()
        self.failed = 0
        self.thread: threading.Thread | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {k: float(v) for k, v in logs.items() if k in self.KEYS and isinstance(v, int | float)}
        if not metrics:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._send, daemon=True, name="dsum-mlflow")
            self.thread.start()
        self.pending.put((state.global_step, metrics))

    def on_train_end(self, args, state, control, **kw):
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
            except Exception as e:
                if not self.failed:
                    warn(f"tracking: step {step} metrics not logged to {self.uri} ({one_line(e)}); training goes on")
                self.failed += 1


def _log_batch(client, run_id: str, params=None, metrics=None, tags=None, step: int = 0) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    metrics = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(params), len(metrics), len(tags), 1), 100):  # MLflow's per-request limit
        client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100], tags=tags[i : i + 100])


def _result_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat numbers of a run's results: tuned_rougeL, base_rougeL, delta_rougeL, delta_rougeL_ci_low, …"""
    out = {}
    for name, m in results.get("metrics", {}).items():
        for key, value in m.items():
            if not isinstance(value, int | float) or value != value:  # NaN: nothing to log
                continue
            out[f"{key}_{name}" if key in ("base", "tuned", "delta") else f"delta_{name}_{key}"] = value
    for key in ("train_loss", "eval_loss", "train_tokens_per_s", "global_step", "trainable_params", "examples"):
        if isinstance(results.get(key), int | float):
            out[key] = results[key]
    return out


def _previous_run(client, run_dir: Path, uri: str) -> str | None:
    """The unfinished MLflow run of a resumed dsum run, if it is in this store."""
    try:
        saved = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("tracking_uri") != uri:
        return None
    try:
        run = client.get_run(saved["run_id"])
    except Exception:
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

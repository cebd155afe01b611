"""dsum against a real two-node Ray cluster on 127.0.0.1 (conftest.ray_cluster): a head with no CPUs and a
worker node that cannot see the driver's directory, as on a real cluster; token auth on.

The driver and the workers share only the storage path: a run completes with its weights, results, MLflow
run (step metrics relayed from the workers) and registered version on the driver's side, from the CLI and
through `ray job submit`. Faults are real: a Ray Train worker process is SIGKILLed from outside; the driver
is SIGKILLed and the same command is run again.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import JOBS, RAY, ROOT, train_workers
from mlflow import MlflowClient

pytestmark = pytest.mark.ray

FAST = ["train.warmup_steps=0", "eval.max_samples=4", "eval.compare_base=false", "train.logging_steps=5"]
SHARED_ONLY = ["scaling.num_workers=2", "train.max_steps=20"]


def _assert_driver_holds_everything(run: Path, store: str, model: str, result: dict, steps: int = 20) -> None:
    """Weights, results with training metrics and ROUGE, an MLflow run with step metrics, a version."""
    assert (run / "final/adapter_model.safetensors").exists()
    saved = json.loads((run / "results.json").read_text())
    assert saved["global_step"] == result["global_step"] == steps and saved["train_loss"] > 0
    assert saved["tuned"]["rougeL"] == result["tuned"]["rougeL"] and saved["examples"] == 4
    logged = list(range(5, steps + 1, 5))
    history = json.loads((run / "train_metrics.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == logged
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    losses = client.get_metric_history(result["tracking"]["run_id"], "loss")
    assert sorted({m.step for m in losses}) == logged, "step metrics relayed from the workers"
    assert client.get_model_version(model, "1").run_id == result["tracking"]["run_id"]


def test_two_nodes_share_only_the_storage_path_and_survive_a_killed_worker(ray_cluster):
    """The default job with 2 workers on the node that can't see the driver's directory. One worker is
    SIGKILLed from outside after two checkpoints; the worker group restarts from the last one."""
    if not ray_cluster.isolated:
        pytest.skip("hiding the driver's directory from the worker node needs root (unshare -m)")
    cwd = ray_cluster.driver_dir / "cli"
    cwd.mkdir()
    # the worker node's view of the driver's directory: an empty tmpfs (its raylet's /proc root shows it)
    raylets = subprocess.run(["pgrep", "-f", "raylet/raylet"], capture_output=True, text=True).stdout.split()
    views = [Path(f"/proc/{pid}/root{cwd}").exists() for pid in raylets]
    assert sorted(views) == [False, True], "one node sees the driver's directory, the other does not"
    store = f"sqlite:///{ray_cluster.driver_dir / 'cli.db'}"
    cmd = [sys.executable, "-m", "dsum.cli", "train", str(JOBS / "tiny-dialogsum.yaml"), *FAST]
    cmd += ["scaling.num_workers=2", "train.max_steps=30", "train.save_steps=5", "scaling.max_failures=1"]
    cmd += ["train.run_name=two-node", f"scaling.storage_path={ray_cluster.storage}", f"tracking.tracking_uri={store}"]
    cmd += ["tracking.registered_model=two-node", "--address", ray_cluster.address, "--json"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    # a second checkpoint in storage means the first was reported and registered with Ray
    _wait(lambda: len(_checkpoints(ray_cluster.storage / "two-node")) >= 2, proc, what="two checkpoints")
    workers = train_workers()
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    result = _finish(proc)
    assert result["resumed_from_step"] >= 5 and result["resumed_from_step"] % 5 == 0, result
    _assert_driver_holds_everything(cwd / "runs/two-node", store, "two-node", result, steps=30)


def _train_cmd(*overrides, address: str) -> list[str]:  # its storage is runs/ray under the test's cwd
    return [sys.executable, "-m", "dsum.cli", "train", str(JOBS / "tiny-dialogsum.yaml"), *FAST, *overrides,
            "--address", address, "--json"]  # fmt: skip


def _checkpoints(storage: Path) -> list[Path]:
    return sorted(storage.glob("checkpoint_*/checkpoint/adapter_model.safetensors"))


def _wait(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"dsum exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def test_driver_killed_same_command_resumes(tmp_path, ray_cluster):
    cmd = _train_cmd("train.run_name=dk", "train.max_steps=40", "train.save_steps=10", address=ray_cluster.address)
    kw = {"cwd": tmp_path, "env": ray_cluster.env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, **kw)
    _wait(lambda: len(_checkpoints(tmp_path / "runs/ray/dk")) >= 2, proc, what="two checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # The cluster notices its driver is gone and ends the job's workers.
    end = time.monotonic() + 120
    while train_workers():
        assert time.monotonic() < end, "workers outlived their driver"
        time.sleep(0.5)
    assert not (tmp_path / "runs/dk/final").exists()
    result = _finish(subprocess.Popen(cmd, **kw))
    assert result["global_step"] == 40 and result["resumed_from_step"] > 0
    assert (tmp_path / "runs/dk/final/adapter_model.safetensors").exists()


def test_ray_job_submit_on_two_nodes(ray_cluster):
    """The same run sent with `ray job submit`: its driver runs on the head, its workers on the other node."""
    out = ray_cluster.driver_dir / "submitted"
    store = f"sqlite:///{ray_cluster.driver_dir / 'submitted.db'}"
    submit = [RAY, "job", "submit", "--address", ray_cluster.dashboard]  # waits for the job, printing its logs
    submit += ["--working-dir", str(ROOT), "--runtime-env", str(ROOT / "ray_cluster/runtime_env.yaml")]
    entry = [sys.executable, "-m", "dsum.cli", "train", "jobs/tiny-dialogsum.yaml", *FAST, *SHARED_ONLY]
    entry += [f"train.output_dir={out}", "train.run_name=submitted", f"scaling.storage_path={ray_cluster.storage}"]
    entry += [f"tracking.tracking_uri={store}", "tracking.registered_model=submitted", "--json"]
    for _ in range(30):  # a head that just started may not have its job agent up yet ("try again later")
        sent = subprocess.run([*submit, "--", *entry], env=ray_cluster.env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in sent.stderr:
            break
        time.sleep(2)
    logs = sent.stdout + sent.stderr
    assert sent.returncode == 0 and "succeeded" in logs, logs[-3000:]
    # The job printed its results (--json) to the logs, and the run landed on the driver's side.
    result = json.loads([line for line in sent.stdout.splitlines() if line.startswith('{"')][-1])
    _assert_driver_holds_everything(out / "submitted", store, "submitted", result)

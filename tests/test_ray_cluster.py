"""dsum against a real Ray cluster: a head started with `ray start` on 127.0.0.1, token auth on.

Faults are real: a Ray Train worker process is SIGKILLed from outside; the driver is SIGKILLed and the
same command is run again; a job goes through `ray job submit` and its logs are read back.
"""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import JOBS, ROOT, free_port, train_workers
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
FAST = ["train.warmup_steps=0", "eval.max_samples=2", "eval.compare_base=false", "train.logging_steps=10"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1 with token authentication, as a user would start one."""
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1"]
    cmd += [f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _train_cmd(*overrides, address: str) -> list[str]:
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


def test_worker_killed_from_outside_run_finishes_from_the_last_checkpoint(tmp_path, ray_head):
    overrides = ["train.run_name=wk", "train.max_steps=100", "train.save_steps=20", "scaling.num_workers=2"]
    cmd = _train_cmd(*overrides, "scaling.max_failures=1", address=ray_head["address"])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ray_head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    storage = tmp_path / "runs/ray/wk"
    # a second checkpoint on disk means the first was reported and registered with Ray
    _wait(lambda: len(_checkpoints(storage)) >= 2, proc, what="two checkpoints")
    workers = train_workers()
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    result = _finish(proc)
    # The restarted worker group picked up a reported checkpoint and ran to the same final step.
    assert result["global_step"] == 100
    assert result["resumed_from_step"] >= 20 and result["resumed_from_step"] % 20 == 0, result


def test_driver_killed_same_command_resumes(tmp_path, ray_head):
    cmd = _train_cmd("train.run_name=dk", "train.max_steps=100", "train.save_steps=20", address=ray_head["address"])
    kw = {"cwd": tmp_path, "env": ray_head["env"], "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
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
    assert result["global_step"] == 100 and result["resumed_from_step"] > 0
    assert (tmp_path / "runs/dk/final/adapter_model.safetensors").exists()


def test_ray_job_submit_runs_the_default_job(tmp_path, ray_head):
    submit = [RAY, "job", "submit", "--address", ray_head["dashboard"], "--no-wait"]
    submit += ["--working-dir", str(ROOT), "--runtime-env", str(ROOT / "ray_cluster/runtime_env.yaml")]
    entry = ["python", "-m", "dsum.cli", "train", "jobs/tiny-dialogsum.yaml", "train.max_steps=20", *FAST]
    entry += [f"train.output_dir={tmp_path / 'runs'}", "train.run_name=submitted", "--json"]
    for _ in range(30):  # a head that just started may not have its job agent up yet ("try again later")
        sent = subprocess.run([*submit, "--", *entry], env=ray_head["env"], capture_output=True, text=True, timeout=300)
        if "No available agent" not in sent.stderr:
            break
        time.sleep(2)
    assert sent.returncode == 0, sent.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", sent.stdout + sent.stderr).group(0)
    token = ray_head["env"]["RAY_AUTH_TOKEN"]
    jobs = JobSubmissionClient(ray_head["dashboard"], headers={"Authorization": f"Bearer {token}"})
    end = time.monotonic() + 600
    while (status := jobs.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < end, f"job {job_id} still {status}"
        time.sleep(2)
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head["dashboard"], job_id], env=ray_head["env"],
                          capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    # The job printed its results (--json) to the logs, and the run landed where the job said.
    result = json.loads([line for line in logs.splitlines() if line.startswith('{"')][-1])
    assert result["global_step"] == 20
    assert (tmp_path / "runs/submitted/final/adapter_model.safetensors").exists()

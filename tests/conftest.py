import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# This machine has no model or dataset hub; say so before any HF library is imported (they read these
# at import), so hub lookups fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory):
    # Tiny presets are built once per session into a private cache, and every run is tracked in a
    # session's own MLflow store (CLI subprocesses inherit both).
    os.environ.setdefault("DSUM_CACHE", str(tmp_path_factory.mktemp("dsum-cache")))
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def dsum(*args, cwd=None, env=None, timeout=900, input=None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "dsum.cli", *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dsum_json(*args, **kw) -> dict:
    proc = dsum(*args, "--json", **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_workers() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayCluster:
    address: str  # GCS, for --address
    dashboard: str  # job server, for `ray job submit`
    env: dict[str, str]  # what a client needs (token auth)
    driver_dir: Path  # the driver's side: hidden from the worker node when `isolated`
    storage: Path  # the one directory both sides share
    isolated: bool


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Two Ray nodes on 127.0.0.1 with token auth, shaped like a real cluster: a head that runs no work
    (--num-cpus=0) and a worker node with 2 CPUs in its own mount namespace, where empty tmpfs mounts hide
    the driver's directory and the head's Ray temp dir (a separate machine has neither). Only `storage` is
    shared. Hiding needs root (unshare -m); elsewhere the nodes share the disk and `isolated` is False."""
    root = tmp_path_factory.mktemp("cluster")
    driver, storage = root / "driver", root / "storage"
    driver.mkdir()
    storage.mkdir()
    temp = Path(tempfile.mkdtemp(prefix="dsum-ray-"))  # short: Ray's socket paths must stay under 108 bytes
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0"]
    head += [
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    node = [RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
    node += ["--disable-usage-stats"]
    isolated = os.geteuid() == 0 and shutil.which("unshare") is not None
    if isolated:
        Path("/tmp/ray").mkdir(exist_ok=True)  # Ray's default temp dir, which a node may fall back to
        hide = (
            'for d in "$1" "$2" "$3"; do mount -t tmpfs -o size=1g dsum-hidden "$d" || exit 1; done; shift 3; exec "$@"'
        )
        node = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide,
            "sh",
            str(driver),
            str(temp),
            "/tmp/ray",
            *node,
        ]
    try:
        for cmd in (head, node):
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stderr[-2000:]
        _wait_for_cpus(f"127.0.0.1:{port}", env, 2)
        yield RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, driver, storage, isolated)
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_cpus(address: str, env: dict, cpus: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while True:
        status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True)
        if f"/{float(cpus)} CPU" in status.stdout:
            return
        assert time.monotonic() < end, f"the worker node did not join: {status.stdout[-1500:]}{status.stderr[-1500:]}"
        time.sleep(1)

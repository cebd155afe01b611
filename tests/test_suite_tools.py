"""The suite's own tools, tested as product code is: `fill_disk` (conftest), which the full-disk test uses on a
tmpfs that a training run keeps writing to, against a writer racing it; `wait_for`'s messages; and the
session cluster's stop, which must leave another session's cluster alone; the order the tests run in."""

import contextlib
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CLUSTER_TAG, ROOT, RayCluster, cluster_processes, fill_disk, tmpfs, wait_for

PAGE = 4096
LEAVE = 16 * 1024


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", "8m") as mounted:
        yield mounted


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


class _Racer:
    """The other writer at its worst: before every allocation the filler makes, it writes `grab` bytes of
    its own (while there is room), as a run's checkpoint upload may between any two of the filler's calls."""

    def __init__(self, disk: Path, grab: int = 64 * 1024):
        self.file, self.grab, self.wrote = open(disk / "racer", "wb"), grab, 0  # noqa: SIM115
        self.real = os.posix_fallocate

    def __call__(self, fd, offset, length):
        try:
            self.wrote += os.write(self.file.fileno(), b"x" * self.grab)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        return self.real(fd, offset, length)


def _fill_by_reading_the_free_space(disk: Path) -> None:
    """How the full-disk test filled its tmpfs before (statvfs, then one allocation of all but LEAVE)."""
    free = _free(disk)
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - LEAVE)


def test_the_racer_breaks_a_fill_that_reads_the_free_space_first(disk, monkeypatch):
    """The race the suite lost once (a checkpoint written between statvfs and the allocation): with the
    racer in between, reading the free space first is always wrong."""
    monkeypatch.setattr(os, "posix_fallocate", _Racer(disk))
    with pytest.raises(OSError) as raised:
        _fill_by_reading_the_free_space(disk)
    assert raised.value.errno == errno.ENOSPC


def test_fill_disk_with_the_racer_before_every_step(disk, monkeypatch):
    racer = _Racer(disk)
    monkeypatch.setattr(os, "posix_fallocate", racer)
    filler = fill_disk(disk, leave=LEAVE)
    assert racer.wrote >= 64 * 1024, "the racer wrote between the filler's steps"
    # full but for what was given back; the racer's writes came first, the filler has the rest
    assert LEAVE <= _free(disk) <= LEAVE + PAGE
    assert filler.stat().st_size + racer.wrote >= 8 * 2**20 - 64 * 1024


def test_fill_disk_with_a_writer_thread_racing_it(disk):
    """A thread writing 64 KiB blocks as fast as it can, as a run uploading a checkpoint does, through five
    fills: each one finishes, the writer then gets ENOSPC, and once the filler is gone it writes again."""
    stop, failures, wrote = threading.Event(), [], []

    def write() -> None:
        with open(disk / "writer", "wb") as f:
            while not stop.is_set():
                try:
                    wrote.append(os.write(f.fileno(), b"y" * 65536))
                except OSError as e:
                    failures.append(e.errno)
                    f.truncate(0)  # a failed checkpoint is removed; the next one tries again
                    f.seek(0)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for _ in range(5):
            before = len(failures)
            filler = fill_disk(disk, leave=LEAVE)
            wait_for(lambda b=before: len(failures) > b, 10, "the writer to find the disk full")  # noqa: B023
            assert set(failures) == {errno.ENOSPC}
            filler.unlink()
    finally:
        stop.set()
        writer.join(10)
    assert sum(wrote) > 8 * 2**20, "the writer kept writing between the fills"


def test_wait_for_says_what_it_waited_for():
    with pytest.raises(pytest.fail.Exception, match=r"waited 0.2 s for the sky to fall"):
        wait_for(lambda: False, 0.2, "the sky to fall", every=0.05)
    proc = subprocess.Popen(["sh", "-c", "exit 3"])
    proc.wait()
    with pytest.raises(pytest.fail.Exception, match=r"the process ended \(exit 3\) before a checkpoint"):
        wait_for(lambda: False, 5, "a checkpoint", proc)
    assert wait_for(lambda: [1], 1, "a list") == [1]


def test_a_session_cluster_stops_its_own_processes_and_no_others(tmp_path):
    """A cluster's processes carry its tag in their environment from `ray start` on, except those that wrote
    over it (setting their title): those are found as descendants. Another cluster's are never touched (the
    stop used to be `ray stop --force`, which killed a load check's cluster when a quick run beside it ended).
    The same stop run on two real session clusters at once: checked when it was written (both up, one
    stopped, the other answering `ray status`)."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    # a tagged parent whose child has an empty environment (as a retitled process reads), and another cluster
    tree = "sleep 60 & env -i sleep 60 & wait"
    ours = subprocess.Popen(["sh", "-c", tree], env={**os.environ, CLUSTER_TAG: str(mine)})
    other = subprocess.Popen(["sh", "-c", tree], env={**os.environ, CLUSTER_TAG: str(theirs)})
    try:
        wait_for(lambda: len(cluster_processes(mine)) == 3, 10, "the shell and its two sleeps")
        found = cluster_processes(mine)
        assert ours.pid in found and other.pid not in found and os.getpid() not in found
        cluster = RayCluster(
            "", "", {}, tmp_path, tmp_path / "storage", False, mine, tmp_path / "node", tmp_path / "node-tmp"
        )
        cluster.stop()
        assert ours.wait(timeout=10) == -9 and cluster_processes(mine) == [] and not mine.exists()
        assert other.poll() is None and len(cluster_processes(theirs)) == 3
    finally:
        for proc in (ours, other):
            for pid in cluster_processes(mine) + cluster_processes(theirs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            proc.wait()


def test_the_quick_tests_go_first_then_the_slow_tiers_longest_first():
    """conftest's order, as pytest itself collects it: the quick tests first (the session's services start
    meanwhile), then sweeps, Ray runs, the other end-to-end runs, whatever order the files were given in."""
    files = ["tests/test_train.py", "tests/test_ray.py", "tests/test_tune.py", "tests/test_config.py"]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    order = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    runs = [f for i, f in enumerate(order) if i == 0 or order[i - 1] != f]
    assert runs == ["tests/test_config.py", "tests/test_tune.py", "tests/test_ray.py", "tests/test_train.py"], runs

"""A worker's scratch directory (dsum.cluster.scratch), held by real processes under the kernel's flock: a
killed worker's directory is removed by the next worker to start and by `reap`, a live worker's never, and a
worker that ends leaves nothing. The same for Ray's own downloads of a checkpoint from a bucket, read by real
processes through Ray's Checkpoint.as_directory. (Ray Train kills its workers with ray.kill: tests/test_ray_cluster.py's
Ctrl-C and tests/test_postgres.py's hung trial check the same on the cluster's worker node.)"""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dsum.cluster import scratch

HOLD = """
import sys
from pathlib import Path
from dsum.cluster import scratch

with scratch.worker_dir(sys.argv[1], job=sys.argv[2]) as out:
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "model.safetensors").write_bytes(bytes(4096))
    print(out, flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def _worker(parent: Path, job: str = "") -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(parent), job], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_workers_scratch_is_reaped_a_live_ones_never_and_an_ended_one_leaves_nothing(tmp_path):
    (tmp_path / "not-dsums").mkdir()
    killed, killed_dir = _worker(tmp_path)
    live, live_dir = _worker(tmp_path)
    assert killed_dir.parent == live_dir.parent == tmp_path and killed_dir != live_dir
    before_locks = tmp_path / f"{scratch.PREFIX}before-locks"  # left by a dsum that took no lock
    before_locks.mkdir()
    (before_locks / "optimizer.pt").write_bytes(bytes(100))
    assert scratch.reap(tmp_path) == [(before_locks, 100)]  # both workers live: theirs stay
    killed.send_signal(signal.SIGKILL)  # as ray.kill ends a Train worker: no cleanup runs
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert (killed_dir / "checkpoint-4" / "model.safetensors").exists()

    # the next worker to start reaps it, and says so in its log
    third, third_dir = _worker(tmp_path)
    assert not killed_dir.exists() and live_dir.exists() and third_dir.exists()
    assert scratch.reap(tmp_path) == []  # two live workers
    live.stdin.close()  # it ends as a worker does: its directory goes with it
    assert live.wait(timeout=30) == 0 and not live_dir.exists(), live.stderr.read()
    third.send_signal(signal.SIGKILL)
    third.wait(timeout=30)
    assert f"dsum: removed {killed_dir} (0.0 MiB), left by a worker that was killed" in third.stderr.read()
    assert scratch.reap(tmp_path) == [(third_dir, 4096)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-dsums"]  # no staging directory either
    for proc in (killed, live, third):
        proc.stdout.close()
        proc.stderr.close()


def test_a_driver_waits_for_its_own_jobs_killed_workers_and_for_no_others(tmp_path):
    """reap(ended=job): Ray ends a killed worker a moment after the run that killed it returned, so the driver
    waits for the directories of its own job's workers (within wait_s), and takes the others' as they are."""
    ours, ours_dir = _worker(tmp_path, "job1")
    theirs, theirs_dir = _worker(tmp_path, "job2")
    assert ours_dir.name.startswith(f"{scratch.PREFIX}job1-") and theirs_dir.name.startswith(f"{scratch.PREFIX}job2-")
    found = []
    reaper = threading.Thread(target=lambda: found.extend(scratch.reap(tmp_path, ended="job1", wait_s=60)))
    start = time.monotonic()
    reaper.start()
    time.sleep(1)
    assert reaper.is_alive()  # waiting for job1's worker, which lives
    ours.send_signal(signal.SIGKILL)
    reaper.join(timeout=30)
    assert found == [(ours_dir, 4096)] and theirs_dir.exists() and time.monotonic() - start < 30
    start = time.monotonic()
    assert scratch.reap(tmp_path, ended="job1", wait_s=60) == [] and time.monotonic() - start < 5  # job2's: no wait
    theirs.stdin.close()
    assert theirs.wait(timeout=30) == 0 and list(tmp_path.iterdir()) == []
    ours.wait(timeout=30)
    for proc in (ours, theirs):
        proc.stdout.close()
        proc.stderr.close()


READ = """
import pickle, sys
checkpoint = pickle.load(open(sys.argv[1], "rb"))
with checkpoint.as_directory() as d:
    print(d, flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_rays_download_of_a_checkpoint_is_reaped_once_its_readers_are_gone_and_only_then(bucket, tmp_path):
    """Two workers of one node read the same checkpoint from a bucket (Ray Train hands each the same Checkpoint;
    here it is pickled once): Ray downloads it once into the node's temp dir. One reader is killed: while the
    other reads, nothing is removed; once that one is done too, Ray leaves the download behind (the killed
    reader's file is still there), and `reap` removes it. A download no reader ever held is left alone."""
    from pyarrow import fs
    from ray.train import Checkpoint
    from ray.train._checkpoint import _CHECKPOINT_TEMP_DIR_PREFIX

    assert scratch.RAY_DOWNLOAD == _CHECKPOINT_TEMP_DIR_PREFIX

    source = tmp_path / "ckpt" / "checkpoint"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(bytes(8192))
    filesystem, root = fs.FileSystem.from_uri(bucket)
    fs.copy_files(str(source.parent), f"{root}/c1", destination_filesystem=filesystem)
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps(Checkpoint(path=f"{root}/c1", filesystem=filesystem)))
    node = tmp_path / "node"
    node.mkdir()
    env = {**os.environ, "TMPDIR": str(node), "RAY_TMPDIR": "/tmp"}  # (Ray's lock files stay in /tmp/_ray_lockfiles)

    killed, live = (subprocess.Popen([sys.executable, "-c", READ, str(tmp_path / "checkpoint.pkl")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2))  # fmt: skip
    download, same = (Path(proc.stdout.readline().strip()) for proc in (killed, live))
    assert download == same and download.parent == node and (download / "checkpoint" / "model.safetensors").exists()
    own = Checkpoint(path=f"{root}/c1", filesystem=filesystem).to_directory(str(node / "checkpoint_tmp_own"))
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert scratch.reap(node) == []  # one reader lives
    live.stdin.close()
    assert live.wait(timeout=30) == 0
    assert download.exists(), "Ray now removes a download a killed reader held: _reap_ray_downloads can go"
    assert scratch.reap(node) == [(download, 8192)]
    assert sorted(p.name for p in node.iterdir()) == [Path(own).name]  # no reader's file left either
    for proc in (killed, live):
        proc.stdout.close()

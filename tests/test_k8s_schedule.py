"""Scheduled sweeps that never overlap: the two scripts `dsum k8s render --schedule` ships, run by bash as the
cluster would run them.

- schedule.sh, the CronJob's tick (in registry.k8s.io/kubectl: bash, jq, kubectl): there is no API server
  here, so `kubectl` is a stand-in on PATH that answers `get rayjobs -o json` with recorded RayJob lists
  (their status fields as KubeRay v1.7 writes them: apis/ray/v1/rayjob_types.go) and logs what it is asked
  to create or delete; jq and bash are real.
- run.sh, every scheduled RayJob's entrypoint (on the Ray head): its lease on the shared volume, with a
  stand-in `dsum` that logs its calls. It runs in a mount namespace where /etc/dsum (the ConfigMap) and
  /mnt/dsum (the volume) are this test's folders, as in a pod (root needed).
"""

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import JOBS, can_mount_namespaces, mounts_prelude, wait_for

from dsum import config
from dsum.deploy import k8s

JOB = config.load(JOBS / "tiny-dialogsum.yaml", ["train.eval_steps=10"])


def _files(opts: k8s.Options) -> dict[str, str]:
    """Every file the rendered ConfigMaps hold, by name."""
    objs = k8s.render(JOB, "jobs/tiny-dialogsum.yaml", opts)
    return {name: text for o in objs if o["kind"] == "ConfigMap" for name, text in o["data"].items()}


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


# ----------------------------------------------------------------------------------------- the CronJob's tick


def _rayjob(name: str, status: str | None, ended_days_ago: float | None = None) -> dict:
    """A RayJob as `kubectl get rayjobs -o json` lists it: KubeRay v1.7's status fields."""
    now = datetime.now(timezone.utc)
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731 (RFC 3339, as the API server writes it)
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": name, "namespace": "dsum", "labels": {k8s.SCHEDULE_LABEL: "tiny-dialogsum-sweep"},
        "creationTimestamp": stamp(now - timedelta(days=(ended_days_ago or 0) + 1))}, "status": {}}  # fmt: skip
    if status is not None:
        job["status"] = {"jobDeploymentStatus": status, "jobId": f"{name}-x7k2p", "rayClusterName": f"{name}-abcde",
                         "jobStatus": {"Complete": "SUCCEEDED", "Failed": "FAILED", "Running": "RUNNING"}.get(status, ""),
                         "startTime": stamp(now - timedelta(days=(ended_days_ago or 0) + 0.5))}  # fmt: skip
        if ended_days_ago is not None:
            job["status"]["endTime"] = stamp(now - timedelta(days=ended_days_ago))
    return job


def _tick(tmp_path: Path, answer: list[dict], queue: str | None = None) -> tuple[subprocess.CompletedProcess, list]:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (the kubectl image ships it)")
    script = tmp_path / "schedule.sh"
    script.write_text(_files(k8s.Options(schedule="0 3 * * *", queue=queue))[k8s.SCHEDULE_SCRIPT])
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (tmp_path / "answer.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": answer}))
    _stand_in(
        bin_, "kubectl", 'echo "$*" >> "$LOG"\ncase "$1" in get) cat "$ANSWER";; create|delete) ;; *) exit 1;; esac\n'
    )
    env = {
        "PATH": f"{bin_}:/usr/bin:/bin",
        "LOG": str(tmp_path / "kubectl.log"),
        "ANSWER": str(tmp_path / "answer.json"),
    }
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    log = tmp_path / "kubectl.log"
    return done, log.read_text().splitlines() if log.exists() else []


SELECTOR = f"get rayjobs -l {k8s.SCHEDULE_LABEL}=tiny-dialogsum-sweep -o json"
CREATE = f"create -f {k8s.JOB_DIR}/rayjob.yaml"


@pytest.mark.parametrize(
    "previous, creates",
    [
        ([], True),
        ([_rayjob("s-1", "Complete", 1)], True),
        ([_rayjob("s-1", "Failed", 1), _rayjob("s-2", "Complete", 0.1)], True),
        ([_rayjob("s-1", "Running")], False),
        ([_rayjob("s-1", "Complete", 2), _rayjob("s-2", "Initializing")], False),
        ([_rayjob("s-1", None)], False),  # just created: the operator has not written a status yet
        ([_rayjob("s-1", "Suspended")], False),  # queued by Kueue: it will run
        ([_rayjob("s-1", "Retrying")], False),  # a retry (backoffLimit) on a new cluster
    ],
    ids=["none", "done", "failed and done", "running", "initializing", "new", "queued", "retrying"],
)
def test_a_tick_creates_a_rayjob_only_when_none_of_its_schedule_runs(tmp_path, previous, creates):
    done, calls = _tick(tmp_path, previous)
    assert done.returncode == 0, done.stderr
    assert calls[0] == SELECTOR
    assert (CREATE in calls) == creates, calls
    if not creates:
        running = [
            j["metadata"]["name"]
            for j in previous
            if j["status"].get("jobDeploymentStatus") not in ("Complete", "Failed")
        ]
        assert done.stdout.strip() == (
            f"dsum: the previous scheduled sweep is still running ({', '.join(running)}); not starting another"
        )


def test_a_queued_schedule_deletes_its_own_finished_rayjobs_after_a_week(tmp_path):
    """Queued (Kueue) RayJobs can't carry deletion rules (suspend needs shutdownAfterJobFinishes, which the
    operator refuses beside them): the tick deletes finished ones a week after their end."""
    previous = [_rayjob("old", "Complete", 8), _rayjob("old-failed", "Failed", 7.5), _rayjob("recent", "Complete", 2)]
    done, calls = _tick(tmp_path, previous, queue="team-a")
    assert done.returncode == 0, done.stderr
    assert calls == [SELECTOR, "delete rayjob old", "delete rayjob old-failed", CREATE]


def test_a_tick_that_cannot_reach_the_api_server_fails(tmp_path):
    """kubectl failing (no API server, no permission) fails the tick's pod, visibly, and creates nothing."""
    done, calls = _tick(tmp_path, [])
    bin_ = tmp_path / "bin"
    _stand_in(bin_, "kubectl", 'echo "$*" >> "$LOG"\necho "error: You must be logged in to the server" >&2\nexit 1\n')
    (tmp_path / "kubectl.log").unlink()
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "LOG": str(tmp_path / "kubectl.log"), "ANSWER": "/dev/null"}
    failed = subprocess.run(["bash", str(tmp_path / "schedule.sh")], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and (tmp_path / "kubectl.log").read_text().splitlines() == [SELECTOR]


# ------------------------------------------------------------------------------------- the RayJob's lease


@pytest.fixture
def pod(tmp_path):
    """run.sh as a scheduled RayJob's head runs it: /etc/dsum (the ConfigMap) and /mnt/dsum (the volume) are
    this test's folders, `dsum` a stand-in that logs its calls."""
    if not can_mount_namespaces():
        pytest.skip("a mount namespace needs root and unshare(1)")
    etc, volume, bin_ = tmp_path / "etc-dsum", tmp_path / "volume", tmp_path / "bin"
    for d in (etc, volume, bin_):
        d.mkdir()
    for name, text in _files(k8s.Options(schedule="0 3 * * *", via="raycronjob")).items():
        (etc / name).write_text(text)
    _stand_in(
        bin_,
        "dsum",
        # tune waits for the file $HOLD (when given), then exits TUNE_EXIT
        'echo "$*" >> "$CALLS"\nif [ "$1" = tune ]; then\n  while [ -n "${HOLD:-}" ] && [ ! -e "$HOLD" ]; do sleep 0.05; done\n'
        '  exit "${TUNE_EXIT:-0}"\nfi\n',
    )
    # the UTC day a run is named by, when DAY is given (two ticks of two days at once)
    _stand_in(
        bin_, "date", '[ -n "${DAY:-}" ] && [ "$*" = "-u +%Y%m%d" ] && { echo "$DAY"; exit; }\nexec /bin/date "$@"\n'
    )

    def start(**env) -> subprocess.Popen:
        calls = tmp_path / f"calls-{time.monotonic_ns()}"
        prelude = mounts_prelude({k8s.JOB_DIR: etc, k8s.MOUNT: volume}, tmp_path / f"scratch-{calls.name}")
        env = {"PATH": f"{bin_}:/usr/bin:/bin", "CALLS": str(calls), **{k: str(v) for k, v in env.items()}}
        cmd = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{prelude} && exec bash {k8s.JOB_DIR}/{k8s.RUN_SCRIPT}",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.calls = calls
        return proc

    def run(**env) -> tuple[subprocess.CompletedProcess, list[str]]:
        proc = start(**env)
        out, err = proc.communicate(timeout=60)
        calls = proc.calls.read_text().splitlines() if proc.calls.exists() else []
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), calls

    today = datetime.now(timezone.utc).strftime("%Y%m%d")
    return type("Pod", (), {"run": staticmethod(run), "start": staticmethod(start), "runs": volume / "runs",
                            "lease": volume / "runs" / ".tiny-dialogsum-sweep.lease", "today": f"tiny-dialogsum-sweep-{today}"})  # fmt: skip


def _sweep_calls(run: str) -> list[str]:
    job = f"{k8s.JOB_DIR}/job.yaml"
    best = f"{k8s.MOUNT}/runs/{run}/best.yaml train.run_name={run}-best tracking.first_champion=false"
    return [f"fetch {job}", f"tune {job} train.run_name={run}", f"train {best}"]


def _hold(pod, run: str, age_s: float) -> None:
    pod.lease.mkdir(parents=True)
    (pod.lease / "run").write_text(run + "\n")
    (pod.lease / "since").write_text(f"{int(time.time() - age_s)}\n")


def test_a_scheduled_run_with_no_lease_sweeps_trains_the_best_and_lets_go(pod):
    done, calls = pod.run()
    assert done.returncode == 0, done.stderr
    assert calls == _sweep_calls(pod.today)
    assert not pod.lease.exists()


def test_a_scheduled_run_while_the_previous_one_runs_starts_nothing_and_says_so(pod):
    _hold(pod, "tiny-dialogsum-sweep-20261129", age_s=3600)
    done, calls = pod.run()
    assert done.returncode == 0 and calls == [], (done.stdout, calls)
    assert done.stdout.strip() == (
        "dsum: the previous scheduled sweep (tiny-dialogsum-sweep-20261129) is still running; not starting another"
    )
    assert (pod.lease / "run").read_text().strip() == "tiny-dialogsum-sweep-20261129"  # not taken


@pytest.mark.parametrize("holder, age_s", [("today", 3600), ("tiny-dialogsum-sweep-20261101", 86400 + 60)],
                         ids=["the same run retried", "a run past its deadline"])  # fmt: skip
def test_a_scheduled_run_takes_over_its_own_or_an_expired_lease(pod, holder, age_s):
    _hold(pod, pod.today if holder == "today" else holder, age_s)
    done, calls = pod.run()
    assert done.returncode == 0 and calls == _sweep_calls(pod.today), done.stderr
    assert "dsum: taking over the lease of" in done.stdout and not pod.lease.exists()


@pytest.mark.parametrize("files", [{"run": "tiny-dialogsum-sweep-20261129\n"},
                                   {"run": "tiny-dialogsum-sweep-20261129\n", "since": ""}],
                         ids=["no start time", "empty start time"])  # fmt: skip
@pytest.mark.parametrize("age_s", [60, 86400 + 60], ids=["young", "past its deadline"])
def test_a_lease_without_a_start_time_is_as_old_as_its_directory(pod, files, age_s):
    """A lease as an older dsum left it mid-write (mkdir, then its files): bash counts an empty start time as
    0 s since 1970, and took over a lease taken a moment ago (two ticks both swept); its directory's mtime
    counts. (dsum's own leases are renamed into place whole, so none is ever seen without its files.)"""
    pod.lease.mkdir(parents=True)
    for name, text in files.items():
        (pod.lease / name).write_text(text)
    os.utime(pod.lease, (time.time() - age_s,) * 2)
    done, calls = pod.run()
    assert done.returncode == 0, done.stderr
    if age_s < 86400:
        assert calls == [] and "is still running; not starting another" in done.stdout, (done.stdout, calls)
        assert sorted(os.listdir(pod.runs)) == [pod.lease.name]  # nothing of the run that backed off is left
    else:
        assert calls == _sweep_calls(pod.today) and "dsum: taking over the lease of" in done.stdout
        assert not pod.lease.exists()


def test_a_failed_sweep_fails_the_ray_job_and_lets_go(pod):
    done, calls = pod.run(TUNE_EXIT=2)
    assert done.returncode == 2 and calls == _sweep_calls(pod.today)[:2]  # the best is not trained
    assert not pod.lease.exists()


@pytest.mark.parametrize("round_", range(4))
def test_two_ticks_at_once_run_one_sweep(pod, round_):
    """Two days' RayJobs starting together (a RayCronJob has no concurrency policy; one was late): the
    rename of a whole lease onto the shared volume decides, and one of them sweeps. (Run four times: it once
    failed under load, when the lease was a mkdir and the loser read its start time before it was written.)"""
    days, hold = ("20261129", "20261130"), pod.runs.parent / "release"
    procs = [pod.start(HOLD=hold, DAY=day) for day in days]
    # the winner's sweep waits until the other has decided (and ended), whatever the order they got there in
    loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), 30, "one of the two to decide")
    hold.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert loser.calls.exists() is False, "the one that ended first started nothing"
    assert [p.returncode for p in procs] == [0, 0], outs
    calls = [p.calls.read_text().splitlines() if p.calls.exists() else [] for p in procs]
    swept = [i for i, c in enumerate(calls) if c]
    assert len(swept) == 1 and calls[swept[0]] == _sweep_calls(f"tiny-dialogsum-sweep-{days[swept[0]]}"), calls
    assert f"sweep (tiny-dialogsum-sweep-{days[swept[0]]}) is still running" in outs[1 - swept[0]][0]
    assert not pod.lease.exists() and os.listdir(pod.runs) == []


@pytest.mark.parametrize("sweep", [False, True], ids=["train", "sweep"])
def test_a_rayjobs_script_fetches_then_runs_dsum_once(tmp_path, sweep):
    """run.sh of a training RayJob and of a sweep RayJob, in a pod's mount namespace with a stand-in dsum:
    `dsum fetch` of the job, then `dsum train` (or `tune`) of it, exec'd (its exit is the Ray job's)."""
    if not can_mount_namespaces():
        pytest.skip("a mount namespace needs root and unshare(1)")
    etc, bin_ = tmp_path / "etc-dsum", tmp_path / "bin"
    etc.mkdir()
    bin_.mkdir()
    for name, text in _files(k8s.Options(sweep=sweep)).items():
        (etc / name).write_text(text)
    _stand_in(bin_, "dsum", 'echo "$*" >> "$CALLS"\n[ "$1" = fetch ] || exit 7\n')
    prelude = mounts_prelude({k8s.JOB_DIR: etc}, tmp_path / "scratch")
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{prelude} && exec bash {k8s.JOB_DIR}/run.sh"]
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    job = f"{k8s.JOB_DIR}/job.yaml"
    assert done.returncode == 7  # dsum train's (or tune's) own exit
    assert (tmp_path / "calls").read_text().splitlines() == [f"fetch {job}", f"{'tune' if sweep else 'train'} {job}"]

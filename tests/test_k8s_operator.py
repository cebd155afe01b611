"""What the KubeRay operator runs, run here against the session's real Ray head (conftest.start_cluster).

For a RayJob in K8sJobMode, KubeRay v1.7.0 starts a submitter pod whose container runs `/bin/bash -ce -- LINE`
(ray-operator/controllers/ray/rayjob_controller.go, configureSubmitterContainer, with
utils.GetContainerCommand), where LINE is BuildJobSubmitCommand's words joined by spaces
(ray-operator/controllers/ray/common/job.go): wait until the dashboard's GCS is healthy; unless
`ray job status` knows the job's id, `ray job submit --no-wait ... --submission-id ID -- ENTRYPOINT`, with
spec.entrypoint pasted unquoted; then `ray job logs --follow ID`. The container's environment holds
RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID, PYTHONUNBUFFERED and, on a token-auth cluster, RAY_AUTH_MODE
and RAY_AUTH_TOKEN. `submitter_line` builds LINE as that function does, and the tests run it with bash,
as the pod would, for each kind of RayJob `dsum k8s render` writes: a training job, a sweep, and a scheduled
sweep as a CronJob's tick creates it (the RayJob in its ConfigMap) and as a RayCronJob creates it (its
jobTemplate). The job's ConfigMap is where the head's pod would have it, /etc/dsum (the head runs in a mount
namespace that shows this test's folder there), and dsum's volume is at /mnt/dsum on both nodes.

The submitter runs in this process's environment with a `dsum` on PATH that fails and leaves a mark: nothing
of dsum may run in the submitter, only in the Ray job, on the cluster.

Not run here: the operator itself, an API server, image builds (none exists on this machine).
"""

import json
import os
import random
import shlex
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from conftest import JOBS, RAY, train_workers, wait_for
from mlflow import MlflowClient

from dsum import config
from dsum.deploy import k8s

# ray-operator/controllers/ray/utils/constant.go (v1.7.0)
HEALTH = """python -c "import urllib.request; r=urllib.request.urlopen('%s', timeout=%d); exit(0 if b'success' in r.read() else 1)\""""
GCS_HEALTH_PATH, HEALTH_TIMEOUT_S = "api/gcs_healthz", 10


def go_quote(text: str) -> str:
    """Go's strconv.Quote, for the printable text a manifest holds: double quotes, with \\ and " escaped."""
    return json.dumps(text, ensure_ascii=False)


def _go_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def job_id(rayjob_name: str) -> str:
    """utils.GenerateRayJobId: the RayJob's name and five of k8s.io/apimachinery/pkg/util/rand's characters."""
    return f"{rayjob_name}-{''.join(random.choices('bcdfghjklmnpqrstvwxz2456789', k=5))}"


def submitter_line(spec: dict, dashboard_url: str, submission_id: str) -> str:
    """common/job.go BuildJobSubmitCommand, K8sJobMode (status.dashboardURL gets http:// in front)."""
    address = dashboard_url if dashboard_url.startswith("http://") else f"http://{dashboard_url}"
    health = HEALTH % (f"{address}/{GCS_HEALTH_PATH}", HEALTH_TIMEOUT_S)
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
           go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";", "sleep", "2", ";",
           "done", ";"]  # fmt: skip
    cmd += ["if", "!", "ray", "job", "status", "--address", address, submission_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):  # getRuntimeEnvJson: sigs.k8s.io/yaml's YAMLToJSON, compact
        cmd += ["--runtime-env-json", go_quote(_go_json(yaml.safe_load(spec["runtimeEnvYAML"])))]
    if spec.get("metadata"):
        cmd += ["--metadata-json", go_quote(_go_json(spec["metadata"]))]
    cmd += ["--submission-id", submission_id]
    if spec.get("entrypointNumCpus", 0) > 0:
        cmd += ["--entrypoint-num-cpus", f"{spec['entrypointNumCpus']:f}"]
    if spec.get("entrypointNumGpus", 0) > 0:
        cmd += ["--entrypoint-num-gpus", f"{spec['entrypointNumGpus']:f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", go_quote(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", submission_id]
    return " ".join(cmd)


FAST = ["train.max_steps=4", "train.warmup_ratio=0", "train.logging_steps=2", "train.save_steps=4",
        "eval.max_samples=4", "eval.compare_base=false", "eval.max_new_tokens=8"]  # fmt: skip
SWEEP = ["train.eval_steps=2", "tune.num_samples=1", "tune.scheduler=none",
         "tune.space={train.learning_rate: {choice: [1.0e-3, 3.0e-3]}}"]  # fmt: skip


def _rendered(tmp_path: Path, overrides: list[str], *flags: str, job: str = "tiny-dialogsum") -> list[dict]:
    out = tmp_path / "rendered.yaml"
    from dsum.cli import main

    assert main(["k8s", "render", str(JOBS / f"{job}.yaml"), *overrides, *flags, "--out", str(out)]) == 0
    return [o for o in yaml.safe_load_all(out.read_text()) if o]


def _created_rayjob(objs: list[dict], form: str) -> dict:
    """The RayJob as the API server would hold it once created: the RayJob itself; a CronJob tick's, from
    generateName (five random characters); a RayCronJob's (raycronjob_controller.go, constructRayJob: named
    <cron>-<minutes since the epoch of the tick>, its spec the jobTemplate)."""
    if form == "cronjob":
        [rayjob] = [yaml.safe_load(o["data"]["rayjob.yaml"]) for o in objs if "rayjob.yaml" in o.get("data", {})]
        rayjob["metadata"]["name"] = rayjob["metadata"].pop("generateName") + job_id("")[1:]
        return rayjob
    if form == "raycronjob":
        [cron] = [o for o in objs if o["kind"] == "RayCronJob"]
        name = f"{cron['metadata']['name']}-{int(time.time()) // 60}"
        return {"kind": "RayJob", "metadata": {"name": name}, "spec": cron["spec"]["jobTemplate"]}
    [rayjob] = [o for o in objs if o["kind"] == "RayJob"]
    return rayjob


class Submitted:
    def __init__(self, proc: subprocess.CompletedProcess, info, tripwire: Path, entrypoint: str, script: str):
        self.proc, self.info, self.tripwire, self.entrypoint = proc, info, tripwire, entrypoint
        self.script = script  # the run.sh the head ran


@pytest.fixture
def submit(ray_cluster, tmp_path):
    """Run a rendered RayJob as KubeRay would: its ConfigMap's files at /etc/dsum on the head, the submitter
    line in bash, then what Ray says of the job (JobSubmissionClient: what KubeRay reads to set the RayJob's
    jobStatus)."""
    if ray_cluster.configmap is None:
        pytest.skip("the head's /etc/dsum and /mnt/dsum need a mount namespace (root)")
    from ray.job_submission import JobSubmissionClient

    bin_ = tmp_path / "submitter-bin"
    bin_.mkdir()
    tripwire = tmp_path / "dsum-ran-in-the-submitter"
    (bin_ / "dsum").write_text(f'#!/bin/sh\necho "$@" >> {tripwire}\nexit 1\n')
    (bin_ / "dsum").chmod(0o755)

    def run(objs: list[dict], form: str, during=None) -> Submitted:
        rayjob = _created_rayjob(objs, form)
        [job_map] = [o for o in objs if o["kind"] == "ConfigMap" and "job.yaml" in o.get("data", {})]
        for old in ray_cluster.configmap.iterdir():  # (the folder itself stays: the head's /etc/dsum is bound to it)
            old.unlink()
        for name, text in job_map["data"].items():  # what the ConfigMap volume shows at /etc/dsum
            (ray_cluster.configmap / name).write_text(text)
        submission = job_id(rayjob["metadata"]["name"])
        dashboard = ray_cluster.dashboard.removeprefix("http://")  # status.dashboardURL: host:port
        line = submitter_line(rayjob["spec"], dashboard, submission)
        env = {"PATH": f"{bin_}:{Path(RAY).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
               "RAY_DASHBOARD_ADDRESS": dashboard, "RAY_JOB_SUBMISSION_ID": submission,
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_cluster.env["RAY_AUTH_TOKEN"]}  # fmt: skip
        with open(tmp_path / "submitter.out", "w") as out, open(tmp_path / "submitter.err", "w") as err:
            running = subprocess.Popen(["/bin/bash", "-ce", "--", line], env=env, stdout=out, stderr=err, text=True)
        running.logs = tmp_path / "submitter.out", tmp_path / "submitter.err"  # (for wait_for's message)
        if during is not None:
            during(running)
        running.wait(timeout=900)
        proc = subprocess.CompletedProcess(running.args, running.returncode, *(f.read_text() for f in running.logs))
        client = JobSubmissionClient(ray_cluster.dashboard)
        info = client.get_job_info(submission)
        return Submitted(proc, info, tripwire, rayjob["spec"]["entrypoint"], job_map["data"][k8s.RUN_SCRIPT])

    return run


def _ran_on_the_cluster(done: Submitted, status: str = "SUCCEEDED") -> None:
    assert done.info.status == status, (done.info.message, done.proc.stdout[-3000:], done.proc.stderr[-2000:])
    # the Ray job is the manifest's entrypoint, one command (ray job submit shlex-joins the words after --)
    assert done.info.entrypoint == shlex.join(shlex.split(done.entrypoint)) == f"bash {k8s.JOB_DIR}/{k8s.RUN_SCRIPT}"
    assert not done.tripwire.exists(), f"dsum ran in the submitter: {done.tripwire.read_text()}"


@pytest.mark.ray
def test_the_mistral_seed_job_as_a_rayjob_trains_on_the_cluster_through_a_killed_worker(
    submit, ray_cluster, seed_model, tmp_path
):
    """The Mistral seed job (LoRA on q,k,v,o, bf16, checkpointing) on its own architecture at tiny width,
    rendered and run as KubeRay runs a RayJob, over two workers on the worker node while its driver runs on
    the head. One worker is SIGKILLed once Ray has registered a checkpoint: the worker group restarts from
    it. The MLflow store is an sqlite file on the volume, which only the driver writes: the workers' step
    metrics are relayed to it. The run ends on the volume with its results, its adapter (which loads again:
    the seed tier's check for this family, test_seed_architectures.py) and a registered version."""
    from test_ray_cluster import _registered
    from test_seed_architectures import SEEDS, SMALL, _adapted, _reload

    job = "mistral-7b-samsum-lora"
    hub, data = SEEDS[job]
    two_workers = ["train.max_steps=12", "train.save_steps=4", "train.logging_steps=2", "scaling.num_workers=2",
                   "train.micro_batch_size=1", "scaling.max_failures=1", "tracking.enabled=true",
                   f"tracking.tracking_uri=sqlite:///{k8s.MOUNT}/mistral.db",
                   "tracking.registered_model=k8s-mistral"]  # fmt: skip
    objs = _rendered(tmp_path, [f"model.name={seed_model(hub)}", *data, *SMALL, *two_workers], job=job)
    storage = ray_cluster.volume / "ray" / "mistral-7b-samsum-lora-train"

    def kill_a_worker(running) -> None:
        wait_for(lambda: _registered(storage) >= 1, 300, "Ray Train to register a checkpoint", running)
        workers = wait_for(
            lambda: (w := train_workers(ray_cluster)) and len(w) == 2 and w, 60, "the job's two workers", running
        )
        os.kill(workers[0], signal.SIGKILL)

    done = submit(objs, "rayjob", during=kill_a_worker)
    _ran_on_the_cluster(done)
    assert "model: " in done.proc.stdout and "nothing to download" in done.proc.stdout  # `dsum fetch` first
    run = ray_cluster.volume / "runs" / "mistral-7b-samsum-lora-train"
    result = json.loads((run / "results.json").read_text())
    assert result["global_step"] == 12 and result["resumed_from_step"] in (4, 8), result
    assert result["examples"] == 2 and "rougeL" in result["tuned"]
    cfg = config.load(run / "config.yaml")
    assert {n.rsplit(".", 1)[-1] for n in _adapted(_reload(cfg, run))} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.model.dtype == "bfloat16" and cfg.train.gradient_checkpointing
    client = MlflowClient(tracking_uri=f"sqlite:///{ray_cluster.volume}/mistral.db")
    losses = client.get_metric_history(result["tracking"]["run_id"], "loss")
    assert sorted({m.step for m in losses}) == [2, 4, 6, 8, 10, 12], "step metrics relayed from the workers"
    [version] = client.search_model_versions("name = 'k8s-mistral'")
    assert version.run_id == result["tracking"]["run_id"]


@pytest.mark.ray
def test_a_sweep_rayjob_runs_dsum_tune_on_the_cluster_and_its_failure_fails_the_ray_job(submit, tmp_path):
    """A sweep RayJob (--sweep) whose data is missing: the Ray job runs run.sh on the head, `dsum tune` stops
    there with its one line, and the Ray job ends FAILED, which is what KubeRay reads to mark the RayJob
    failed (the submitter's own exit is `ray job logs --follow`'s, 0 whatever the job's status, in Ray 2.60).
    A sweep that succeeds on the cluster is the scheduled one's, below (its `dsum tune` line is this one's
    with the day's run name: tests/test_k8s.py, test_render_every_seed_job)."""
    objs = _rendered(tmp_path, [*FAST, *SWEEP, "data.source=/nonexistent/dialogues.jsonl"], "--sweep")
    done = submit(objs, "rayjob")
    _ran_on_the_cluster(done, status="FAILED")
    assert 'exec dsum tune "$job"' in done.script
    assert (
        "dsum: error: /etc/dsum/job.yaml: data.source: /nonexistent/dialogues.jsonl: no such file" in done.proc.stdout
    )


def _scheduled(tmp_path: Path, form: str, tracking: list[str]) -> list[dict]:
    flags = ["--schedule", "0 3 * * *", "--via", form]
    return _rendered(tmp_path / form, [*FAST, *SWEEP, "name=nightly", *tracking], *flags)


def _rayjob_of(objs: list[dict], form: str) -> tuple[dict, dict]:
    """The spec of the RayJob a schedule creates, and its job ConfigMap's files."""
    files = next(o for o in objs if "job.yaml" in o.get("data", {}))["data"]
    return _created_rayjob(objs, form)["spec"], files


@pytest.mark.ray
def test_a_scheduled_sweep_sweeps_then_registers_the_best_without_promoting_it(
    submit, ray_cluster, mlflow_server, tmp_path
):
    """A scheduled sweep, as the CronJob's tick and as a RayCronJob create its RayJob. Both forms create the
    same RayJob (spec and ConfigMap files, asserted first), so the sweep runs once, from the RayCronJob's:
    the sweep, named by the UTC date, then the best configuration trained and registered as a version that is
    not champion (it waits for `dsum promote`), then the schedule's lease released. Then the CronJob's RayJob
    is submitted while another day's sweep holds the lease: its Ray job runs run.sh on the cluster, starts
    nothing and says so."""
    (tmp_path / "cronjob").mkdir()
    (tmp_path / "raycronjob").mkdir()
    tracking = [f"tracking.tracking_uri={mlflow_server.url}", "tracking.registered_model=k8s-nightly"]
    forms = {form: _scheduled(tmp_path, form, tracking) for form in ("cronjob", "raycronjob")}
    assert _rayjob_of(forms["cronjob"], "cronjob") == _rayjob_of(forms["raycronjob"], "raycronjob")

    done = submit(forms["raycronjob"], "raycronjob")
    _ran_on_the_cluster(done)
    run = f"nightly-sweep-{datetime.now(timezone.utc):%Y%m%d}"
    runs = ray_cluster.volume / "runs"
    assert len(json.loads((runs / run / "sweep.json").read_text())["trials"]) == 1
    best = json.loads((runs / f"{run}-best" / "results.json").read_text())
    assert best["tracking"]["model_version"] == "1" and best["tracking"]["champion"] is False
    client = mlflow_server.client()
    assert client.get_registered_model("k8s-nightly").aliases == {}, "registered, not promoted"
    lease = runs / ".nightly-sweep.lease"
    assert not lease.exists()

    lease.mkdir()
    (lease / "run").write_text("nightly-sweep-20261129\n")
    (lease / "since").write_text(f"{int(time.time()) - 600}\n")
    again = submit(forms["cronjob"], "cronjob")
    _ran_on_the_cluster(again)
    assert "dsum: the previous scheduled sweep (nightly-sweep-20261129) is still running; not starting another" in (
        again.proc.stdout
    )
    assert len(client.search_model_versions("name = 'k8s-nightly'")) == 1


def test_the_submitter_line_is_what_the_operator_writes():
    """submitter_line against KubeRay's own unit test of BuildJobSubmitCommand (v1.7.0, common/job_test.go,
    TestBuildJobSubmitCommandWithK8sJobModeAndYAML): the same RayJob, the same words."""
    spec = {
        "runtimeEnvYAML": 'working_dir: "https://github.com/ray-project/serve_config_examples/archive/'
        'b393e77bbd6aba0881e3d94c05f968f05a387b96.zip"\npip: ["python-multipart==0.0.6"]\n',
        "metadata": {"testKey": "testValue"},
        "entrypoint": "echo no quote 'single quote' \"double quote\"",
    }
    address = "http://127.0.0.1:8265"
    expected = ["until", HEALTH % (f"{address}/{GCS_HEALTH_PATH}", HEALTH_TIMEOUT_S), ">/dev/null", "2>&1", ";",
                "do", "echo", go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";",
                "sleep", "2", ";", "done", ";",
                "if", "!", "ray", "job", "status", "--address", address, "testJobId", ">/dev/null", "2>&1", ";", "then",
                "ray", "job", "submit", "--address", address, "--no-wait",
                "--runtime-env-json", go_quote('{"working_dir":"https://github.com/ray-project/serve_config_examples/'
                                               'archive/b393e77bbd6aba0881e3d94c05f968f05a387b96.zip",'
                                               '"pip":["python-multipart==0.0.6"]}'),
                "--metadata-json", go_quote('{"testKey":"testValue"}'),
                "--submission-id", "testJobId", "--", "echo no quote 'single quote' \"double quote\"", ";", "fi", ";",
                "ray", "job", "logs", "--address", address, "--follow", "testJobId"]  # fmt: skip
    assert submitter_line(spec, address, "testJobId") == " ".join(expected)


def test_the_submitter_line_of_a_rendered_rayjob(tmp_path):
    """For dsum's RayJob: the entrypoint resources quoted as Go quotes them; bash reads back what Ray gets."""
    [rayjob] = [o for o in _rendered(tmp_path, []) if o["kind"] == "RayJob"]
    line = submitter_line(rayjob["spec"], "dsum-head-svc.dsum.svc.cluster.local:8265", "job-abcde")
    submit = line.split(" ; then ")[1].split(" ; fi ; ")[0]
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {submit}"], capture_output=True, text=True).stdout.split(
        "\n"
    )
    assert words[-6:] == ["--entrypoint-resources", '{"dsum-driver": 1}', "--", "bash", "/etc/dsum/run.sh", ""]


def test_the_config_the_cluster_runs_loads(tmp_path):
    objs = _rendered(tmp_path, [*FAST, *SWEEP], "--schedule", "0 3 * * *")
    job_yaml = next(o for o in objs if "job.yaml" in o.get("data", {}))["data"]["job.yaml"]
    assert config.from_dict(yaml.safe_load(job_yaml)).train.output_dir == f"{k8s.MOUNT}/runs"

"""Kubernetes manifests, validated offline: every kustomize overlay (rendered by the real `kubectl kustomize`)
and `dsum k8s render` for every seed job, with and without --sweep / --schedule.

- Core kinds validate strictly (an unknown field fails) against the Kubernetes schemas of a pinned version
  (kubernetes-validate); so does every pod template inside a Ray kind, as a PodTemplate.
- Ray kinds validate against dsum's KubeRay v1.7 schema and the operator's own rules (dsum.deploy.kuberay).
- Every object holds dsum's pod, exposure and secret rules (dsum.deploy.policy); the tests below show each
  rule failing on a manifest that breaks it.
"""

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

from dsum import config
from dsum.cli import main
from dsum.deploy import k8s, kuberay, policy

K8S = ROOT / "k8s"
KUBERNETES = "1.32.0"  # the pinned API version (kubectl here is 1.32)
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/cpu-dev"]
SEED_JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
MODES = {
    "train": [],
    "sweep": ["--sweep"],
    "cronjob": ["--schedule", "0 3 * * *"],
    "raycronjob": ["--schedule", "30 2 * * 1", "--via", "raycronjob", "--time-zone", "Europe/Berlin"],
}


def validate(objs: list[dict]) -> list[str]:
    """Every problem the Kubernetes schemas, the KubeRay schema and rules, and dsum's policy find."""
    found = policy.violations(objs)
    for obj in objs:
        name = f"{obj['kind']} {obj['metadata'].get('name')}"
        if obj["kind"] in kuberay.SCHEMAS:
            found += kuberay.problems(obj)
            for where, template in kuberay.pod_templates(obj):
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                found += _core(pod, f"{name}: {where}")
        else:
            found += _core(obj, name)
        if obj["kind"] == "ConfigMap" and "rayjob.yaml" in obj.get("data", {}):
            found += validate([yaml.safe_load(obj["data"]["rayjob.yaml"])])
    return found


def _core(obj: dict, name: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    return []


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(job: Path, *args: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"{job.stem}.{abs(hash(args))}.yaml"
    assert main(["k8s", "render", str(job), *args, "--out", str(out)]) == 0
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def _sweepable(job: Path) -> list[str]:
    return [] if config.load(job).train.eval_steps else ["train.eval_steps=10"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    tmp = tmp_path_factory.mktemp("k8s")
    out = {}
    for job in SEED_JOBS:
        for mode, args in MODES.items():
            extra = _sweepable(job) if mode != "train" else []
            out[job.stem, mode] = render(job, *extra, *args, tmp_path=tmp)
    return out


# ------------------------------------------------------------------------------------ what is shipped


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_every_overlay_renders_and_validates(where):
    objs = kustomize(K8S / where)
    assert validate(objs) == []
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "RayCluster", "Deployment", "Service", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    assert ("StatefulSet" in kinds) == (where != "base")  # Postgres comes with the overlays
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head schedules no training
    assert cluster["enableInTreeAutoscaling"] and cluster["workerGroupSpecs"][0]["minReplicas"] == 0
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    gpus = worker["containers"][0]["resources"]["limits"].get(k8s.GPU)
    assert gpus == (None if where == "overlays/cpu-dev" else 1)
    assert ("tolerations" in worker) == (gpus is not None)
    mounts = {m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    assert k8s.MOUNT in mounts  # the checkpoint volume, in every Ray pod
    if where != "base":
        images = {c.get("image", "") for o in objs for _, pod in policy.pod_specs(o) for c in pod["containers"]}
        images.discard("")  # the autoscaler sidecar runs the Ray image
        assert all(i.startswith("ghcr.io/your-org/dsum:") for i in images if "postgres" not in i), images


@pytest.mark.parametrize("job", SEED_JOBS, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", MODES)
def test_render_every_seed_job(rendered, job, mode):
    objs = rendered[job.stem, mode]
    assert validate(objs) == []
    kinds = [o["kind"] for o in objs]
    expected = {
        "train": ["ConfigMap", "RayJob"],
        "sweep": ["ConfigMap", "RayJob"],
        "raycronjob": ["ConfigMap", "RayCronJob"],
        "cronjob": ["ConfigMap", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"],
    }[mode]
    assert kinds == expected
    # the job the cluster runs is the job file's, with the cluster's paths: it loads like any job
    text = objs[0]["data"]["job.yaml"]
    on_cluster = config.from_dict(yaml.safe_load(text), source="configmap")
    original = config.load(job, _sweepable(job) if mode != "train" else [])
    assert on_cluster.train.output_dir == f"{k8s.MOUNT}/runs"
    assert on_cluster.scaling.storage_path == f"{k8s.MOUNT}/ray"
    for section in ("model", "data", "method", "eval", "tracking"):
        assert getattr(on_cluster, section) == getattr(original, section)
    spec = _ray_job_spec(objs)
    assert f"{k8s.JOB_DIR}/job.yaml" in spec["entrypoint"]
    assert spec["entrypoint"].startswith("dsum train") if mode == "train" else "dsum tune" in spec["entrypoint"]
    if mode in ("cronjob", "raycronjob"):  # the best configuration is trained and waits for `dsum promote`
        assert "best.yaml" in spec["entrypoint"] and "tracking.first_champion=false" in spec["entrypoint"]


def _ray_job_spec(objs: list[dict]) -> dict:
    for obj in objs:
        if obj["kind"] == "RayJob":
            return obj["spec"]
        if obj["kind"] == "RayCronJob":
            return obj["spec"]["jobTemplate"]
        if obj["kind"] == "ConfigMap" and "rayjob.yaml" in obj["data"]:
            return yaml.safe_load(obj["data"]["rayjob.yaml"])["spec"]
    raise AssertionError("no RayJob")


@pytest.mark.parametrize("job", SEED_JOBS, ids=lambda p: p.stem)
def test_rayjob_asks_for_the_gpus_its_scaling_asks_for(rendered, job, tmp_path):
    s = config.load(job).scaling
    for mode, per_trial in (("train", 1), ("sweep", None)):
        spec = _ray_job_spec(rendered[job.stem, mode])
        cluster = spec["rayClusterSpec"]
        [group] = cluster["workerGroupSpecs"]
        if per_trial is None:  # a sweep's cluster holds the trials it runs at once
            per_trial = k8s.trials_at_once(config.load(job, _sweepable(job)), k8s.Options())
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == s.num_workers * per_trial
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get(k8s.GPU) == (1 if s.use_gpu else None)
        assert group["rayStartParams"]["num-cpus"] == f"{s.cpus_per_worker:g}"
        head = cluster["headGroupSpec"]
        head_gpus = head["template"]["spec"]["containers"][0]["resources"]["limits"].get(k8s.GPU)
        assert head["rayStartParams"]["num-cpus"] == "0"  # the head trains nothing ...
        assert head_gpus == (1 if s.use_gpu else None)  # ... and evaluates on its GPU, the driver's
        assert spec.get("entrypointNumGpus", 0) == (1 if s.use_gpu else 0)
        total = group["replicas"] * (limits.get(k8s.GPU) or 0) + (head_gpus or 0)
        assert total == ((s.num_workers * per_trial + 1) if s.use_gpu else 0)
    # scaling overrides reach the manifest
    objs = render(job, "scaling.num_workers=4", "scaling.use_gpu=true", "scaling.cpus_per_worker=6", tmp_path=tmp_path)
    [group] = _ray_job_spec(objs)["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4 and group["rayStartParams"]["num-cpus"] == "6"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "7",
        "memory": "48Gi",
        k8s.GPU: 1,
    }


def test_k8s_jobs_folder_is_what_render_writes(tmp_path):
    """k8s/jobs/ holds the seed jobs' manifests: each line of its render.sh, run again, gives the same file."""
    script = (K8S / "jobs" / "render.sh").read_text()
    env = dict(line.split("=", 1) for line in script.splitlines() if line[:4] in ("GPU=", "CPU="))
    lines = [line for line in script.splitlines() if line.startswith("dsum k8s render")]
    assert len(lines) == len([p for p in (K8S / "jobs").glob("*.yaml") if p.name != "promote.yaml"]) >= 6
    for line in lines:
        argv = [env.get(a[1:], a) if a.startswith("$") else a for a in shlex.split(line)[1:]]
        shipped = ROOT / argv[argv.index("--out") + 1]
        argv[argv.index("--out") + 1] = str(tmp_path / shipped.name)
        assert main(argv) == 0
        assert (tmp_path / shipped.name).read_text() == shipped.read_text(), f"{shipped}: run k8s/jobs/render.sh"


def test_promote_job_validates():
    [job] = list(yaml.safe_load_all((K8S / "jobs" / "promote.yaml").read_text()))
    assert validate([job]) == []
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["dsum", "promote"] and job["spec"]["backoffLimit"] == 0


def test_dockerfile_builds_gpu_and_cpu_images_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["gpu", "cpu"]
    assert "nvidia/cuda" in text and "slim" in text
    for stage in text.split("\nFROM ")[1:]:
        assert "USER 1000" in stage and '".[all]"' in stage


# ------------------------------------------------------------------------------- each rule, broken


@pytest.fixture
def rayjob(rendered) -> dict:
    return copy.deepcopy(rendered["mistral-7b-samsum-lora", "train"][1])


def _head(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


BREAKS = {
    "privileged": (lambda o: _head(o)["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    "root user": (lambda o: _head(o)["securityContext"].update(runAsUser=0), "root"),
    "root container": (lambda o: _head(o)["containers"][0]["securityContext"].update(runAsUser=0), "root"),
    "escalation": (
        lambda o: _head(o)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "writable root": (
        lambda o: _head(o)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "no limits": (lambda o: _head(o)["containers"][0]["resources"].pop("limits"), "no cpu / memory limits"),
    "no memory request": (
        lambda o: _head(o)["containers"][0]["resources"]["requests"].pop("memory"),
        "memory requests",
    ),
    "host path": (lambda o: _head(o)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "exposed dashboard": (
        lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "exposes the Ray dashboard",
    ),
    "literal token": (
        lambda o: _head(o)["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "abc"}),
        "HF_TOKEN holds a literal value",
    ),
    "uri with password": (
        lambda o: _head(o)["containers"][0]["env"].append(
            {"name": "MLFLOW_TRACKING_URI", "value": "http://admin:hunter2@mlflow:5000"}
        ),
        "a URI with credentials",
    ),
    "token in entrypoint": (
        lambda o: o["spec"].update(entrypoint=o["spec"]["entrypoint"] + " HF_TOKEN=hf_" + "a" * 34),
        "a Hugging Face token",
    ),
}


@pytest.mark.parametrize("case", BREAKS)
def test_policy_fails_a_manifest_that_breaks_a_rule(rayjob, case):
    assert policy.violations([rayjob]) == []
    breaks, says = BREAKS[case]
    breaks(rayjob)
    found = policy.violations([rayjob])
    assert found and any(says in f for f in found), found
    with pytest.raises(Exception, match="would be rejected"):
        k8s.check([rayjob])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
def test_policy_fails_exposed_services_and_contained_secrets():
    objs = kustomize(K8S / "overlays" / "gpu")
    mlflow = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "dsum-mlflow")
    for kind in ("NodePort", "LoadBalancer"):
        exposed = copy.deepcopy(mlflow)
        exposed["spec"]["type"] = kind
        assert any(kind in v for v in policy.violations([exposed]))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dsum-mlflow-db"}, "stringData": {"uri": "x"}}
    assert any("Secret with its values" in v for v in policy.violations([secret]))
    assert policy.violations([{**secret, "stringData": {}}]) == []  # a Secret without values is fine
    deployment = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["args"].append("--backend-store-uri=postgresql://u:pw@db/x")
    assert any("URI with credentials" in v for v in policy.violations([deployment]))
    assert policy.violations(objs) == []  # $(VAR) references in a URI are not credentials


RULES = {
    "unknown field": (lambda s: s.update(entrypointNumTpus=1), "entrypointNumTpus"),
    "wrong type": (lambda s: s.update(backoffLimit="2"), "backoffLimit"),
    "bad enum": (lambda s: s.update(submissionMode="JobMode"), "submissionMode"),
    "ttl without shutdown": (lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished"),
    "deletion rules with shutdown": (
        lambda s: s.update(
            deletionStrategy={"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}]}
        ),
        "deletionRules",
    ),
    "backoff with cluster selector": (
        lambda s: (s.pop("rayClusterSpec"), s.update(clusterSelector={"ray.io/cluster": "dsum"})),
        "clusterSelector",
    ),
    "backoff in interactive mode": (lambda s: s.update(submissionMode="InteractiveMode"), "InteractiveMode"),
    "sidecar with submitter": (lambda s: s.update(submissionMode="SidecarMode"), "SidecarMode"),
    "suspend without shutdown": (
        lambda s: s.update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
        "suspend",
    ),
    "unknown worker field": (
        lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=1),
        "workerGroupSpecs.0",
    ),
    "start params not strings": (
        lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "rayStartParams.num-cpus",
    ),
}


@pytest.mark.parametrize("case", RULES)
def test_kuberay_schema_and_operator_rules_reject(rayjob, case):
    assert kuberay.problems(rayjob) == []
    breaks, says = RULES[case]
    breaks(rayjob["spec"])
    found = kuberay.problems(rayjob)
    assert found and any(says in f for f in found), found
    cron = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "x"}}
    cron["spec"] = {"schedule": "0 3 * * *", "jobTemplate": rayjob["spec"]}
    assert any(says in f for f in kuberay.problems(cron)), "the same rules hold inside a RayCronJob"


@pytest.mark.parametrize("kind, limit", sorted(kuberay.NAME_LIMITS.items()))
def test_names_the_operator_would_refuse(rayjob, kind, limit):
    spec = rayjob["spec"] if kind == "RayJob" else rayjob["spec"]["rayClusterSpec"]
    if kind == "RayCronJob":
        spec = {"schedule": "0 3 * * *", "jobTemplate": rayjob["spec"]}
    obj = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": "a" * limit}, "spec": spec}
    assert kuberay.problems(obj) == []
    obj["metadata"]["name"] += "a"
    assert any(f"longer than {limit}" in p for p in kuberay.problems(obj))


def test_render_keeps_long_job_names_within_the_limits(tmp_path):
    long = "a-very-long-job-name-for-a-nightly-summarization-sweep-of-dialogues"
    objs = render(SEED_JOBS[0], f"name={long}", *_sweepable(SEED_JOBS[0]), *MODES["raycronjob"], tmp_path=tmp_path)
    cron = next(o for o in objs if o["kind"] == "RayCronJob")
    assert len(cron["metadata"]["name"]) <= kuberay.NAME_LIMITS["RayCronJob"]
    assert validate(objs) == []


def test_core_validation_is_strict(rendered):
    cron_job = copy.deepcopy(rendered["tiny-dialogsum", "cronjob"][-1])
    assert validate([cron_job]) == []
    cron_job["spec"]["concurrencyPolicyy"] = "Forbid"
    assert any("concurrencyPolicyy" in p for p in validate([cron_job]))


def test_the_scheduler_may_only_create_rayjobs(rendered):
    objs = rendered["flan-t5-base-dialogsum-lora", "cronjob"]
    role = next(o for o in objs if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
    cron = next(o for o in objs if o["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["schedule"] == "0 3 * * *"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == role["metadata"]["name"]
    assert pod["containers"][0]["args"] == ["create", "-f", f"{k8s.JOB_DIR}/rayjob.yaml"]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, says",
    [
        (["--schedule", "*/5 * * * *"], "--schedule '*/5 * * * *': fires more than once a day"),
        (["--schedule", "daily"], "--schedule 'daily': not a cron schedule"),
        (["--sweep"], "tune.metric: eval_loss is reported every train.eval_steps, which is not set"),
        (["--sweep", "train.eval_steps=10", "tune.num_samples=0"], "tune.num_samples"),
        (["scaling.num_workers=0"], "scaling.num_workers"),
    ],
)
def test_bad_render_is_one_line_and_writes_nothing(tmp_path, capsys, args, says):
    out = tmp_path / "out.yaml"
    assert main(["k8s", "render", str(ROOT / "jobs" / "tiny-dialogsum.yaml"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsum: error: ") and says in err[0], err
    assert not out.exists()


def test_render_json_and_stdout(capfd):
    assert main(["k8s", "render", str(ROOT / "jobs" / "tiny-dialogsum.yaml"), "--json"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert [o["kind"] for o in result["objects"]] == ["ConfigMap", "RayJob"]
    assert main(["k8s", "render", str(ROOT / "jobs" / "tiny-dialogsum.yaml"), "--namespace", "ml"]) == 0
    objs = list(yaml.safe_load_all(capfd.readouterr().out))
    assert [o["metadata"]["namespace"] for o in objs] == ["ml", "ml"]

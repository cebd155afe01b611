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
from dsum.deploy import k8s, kuberay, policy, rules

K8S = ROOT / "k8s"
JOBS_DIR = ROOT / "jobs"
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
    assert cluster["headGroupSpec"]["resources"]["cpu"] == "0"  # the head schedules no training
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


# Kinds that have no namespace (kubectl api-resources --namespaced=false, Kubernetes 1.32): everything else an
# overlay makes belongs in dsum's namespace, beside its Secrets, Services and NetworkPolicies.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass"}  # fmt: skip


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_every_namespaced_object_of_every_overlay_is_in_dsum(where):
    objs = kustomize(K8S / where)
    outside = [f"{o['kind']} {o['metadata']['name']}" for o in objs
               if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != "dsum"]  # fmt: skip
    assert outside == []
    assert any(o["kind"] == "StatefulSet" for o in objs) == (where != "base")  # the Postgres component's, too


# The KubeRay operator pod's labels, in each way of installing v1.7 (recorded from its files, with the
# defaults): helm-chart/kuberay-operator/templates/deployment.yaml (name: the chart's name or nameOverride;
# component: the chart's name or componentOverride; instance: the release) and
# ray-operator/config/manager/manager.yaml (the kustomize install).
OPERATOR_POD_LABELS = {
    "helm": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
             "app.kubernetes.io/component": "kuberay-operator"},
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}  # fmt: skip
# What the operator puts on a head pod besides the template's labels (controllers/ray/common/pod.go,
# labelPod; utils/constant.go: RayNodeTypeLabelKey "ray.io/node-type", value rayv1.HeadNode "head").
OPERATOR_HEAD_LABELS = {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes", "ray.io/cluster": "dsum",
                        "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}  # fmt: skip


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector: every matchLabels pair and matchExpressions term holds."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for term in selector.get("matchExpressions", []):
        value, op = labels.get(term["key"]), term["operator"]
        ok &= {"In": value in term.get("values", []), "NotIn": value not in term.get("values", []),
               "Exists": value is not None, "DoesNotExist": value is None}[op]  # fmt: skip
    return ok


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
@pytest.mark.parametrize("install", OPERATOR_POD_LABELS)
def test_the_operator_reaches_the_head_dashboard_however_it_was_installed(install):
    objs = kustomize(K8S / "overlays" / "gpu")
    policy_ = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "dsum-ray-head")
    cluster = next(o for o in objs if o["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"] | OPERATOR_HEAD_LABELS
    assert _selects(policy_["spec"]["podSelector"], head)
    operator_rules = [r for r in policy_["spec"]["ingress"] if any("namespaceSelector" in f for f in r["from"])]
    reaches = [
        r for r in operator_rules if any(_selects(f["podSelector"], OPERATOR_POD_LABELS[install]) for f in r["from"])
    ]
    assert reaches and reaches[0]["ports"] == [{"port": 8265, "protocol": "TCP"}]


def _ray_start_flags(group: dict, limits: dict) -> dict:
    """The `ray start` flags KubeRay v1.7 writes for a group (controllers/ray/common/pod.go):
    updateRayStartParamsResources (group resources: cpu → num-cpus, memory, GPU names → num-gpus, any other
    → resources='{json}' in single quotes), then addWellKnownAcceleratorResources (num-gpus from the
    container's GPU limit if unset; getResourcesMap parses `resources` back with the quotes trimmed), then
    convertParamMap (--key=value, keys sorted)."""
    params = dict(group.get("rayStartParams", {}))
    custom = {}
    for name, quantity in (group.get("resources") or {}).items():
        value = float(rules.quantity_bytes(quantity))
        if name.lower() == "cpu":
            params["num-cpus"] = str(int(value))
        elif name.lower() == "memory":
            params["memory"] = str(int(value))
        elif name.lower().endswith("/gpu"):  # utils.IsGPUResourceKey
            params["num-gpus"] = str(int(value))
        else:
            custom[name] = value
    if custom:
        params["resources"] = "'" + json.dumps(custom, separators=(",", ":")) + "'"
    if "resources" in params:
        json.loads(params["resources"].strip("'\"` "))  # getResourcesMap: the operator fails a pod otherwise
    if "num-gpus" not in params and int(limits.get(k8s.GPU, 0)):
        params["num-gpus"] = str(limits[k8s.GPU])
    return {k: params[k] for k in sorted(params)}


@pytest.mark.parametrize("job", ["tiny-dialogsum", "mistral-7b-samsum-lora"])
def test_ray_resources_reach_ray_start_as_the_operator_writes_them(job, tmp_path):
    """Each group's Ray resources, through the operator's conversion into `ray start` flags, then through
    bash (the operator runs the start command in one) and Ray's own parser of --resources."""
    from ray._private.utils import parse_resources_json  # what `ray start` itself calls (ray/scripts/scripts.py)
    from ray.autoscaler._private.cli_logger import cf, cli_logger

    objs = render(
        JOBS_DIR / f"{job}.yaml", "scaling.resources_per_worker={accelerator_type_a10g: 1}", tmp_path=tmp_path
    )
    cluster = _ray_job_spec(objs)["rayClusterSpec"]
    gpu = config.load(JOBS_DIR / f"{job}.yaml").scaling.use_gpu
    for group, want in ((cluster["headGroupSpec"], {k8s.DRIVER_RESOURCE: 1.0}),
                        (cluster["workerGroupSpecs"][0], {"accelerator_type_a10g": 1.0})):  # fmt: skip
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        flags = _ray_start_flags(group, limits)
        line = " ".join(f"--{k}={v}" for k, v in flags.items())
        argv = subprocess.run(["bash", "-c", f'printf "%s\\n" {line}'], capture_output=True, text=True).stdout.split(
            "\n"
        )
        resources = next(a.split("=", 1)[1] for a in argv if a.startswith("--resources="))
        assert parse_resources_json(resources, cli_logger, cf) == want
        assert flags["num-cpus"] == ("0" if group is cluster["headGroupSpec"] else group["resources"]["cpu"])
        assert flags.get("num-gpus") == ("1" if gpu else None)


@pytest.mark.parametrize("mode", MODES)
def test_every_ray_pod_caches_models_on_the_shared_volume(rendered, mode):
    spec = _ray_job_spec(rendered["flan-t5-base-dialogsum-lora", mode])
    for where, template in kuberay.pod_templates({"kind": "RayJob", "spec": spec}):
        if "submitter" in where:
            continue
        [container] = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (
            env["HF_HOME"] == f"{k8s.MOUNT}/hf"
            and {"name": "storage", "mountPath": k8s.MOUNT} in container["volumeMounts"]
        )


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
    # one command: KubeRay pastes it unquoted into a shell line (tests/test_k8s_operator.py runs that line)
    assert spec["entrypoint"] == f"bash {k8s.JOB_DIR}/{k8s.RUN_SCRIPT}"
    script = objs[0]["data"][k8s.RUN_SCRIPT].splitlines()
    assert script[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in script
    commands = [line for line in script if line.startswith(("dsum ", "exec dsum "))]
    if mode in ("train", "sweep"):
        assert commands == ['dsum fetch "$job"', f'exec dsum {"tune" if mode == "sweep" else "train"} "$job"']
    else:  # the sweep, then its best configuration trained, registered, waiting for `dsum promote`
        assert commands[:2] == ['dsum fetch "$job"', 'dsum tune "$job" train.run_name="$run"']
        assert commands[2].endswith('/best.yaml train.run_name="$run-best" tracking.first_champion=false')
        assert len(commands) == 3


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
        assert group["resources"]["cpu"] == f"{s.worker_cpus():g}" and group["rayStartParams"] == {}
        assert group["resources"].get(k8s.GPU) == ("1" if s.use_gpu else None)
        head = cluster["headGroupSpec"]
        head_gpus = head["template"]["spec"]["containers"][0]["resources"]["limits"].get(k8s.GPU)
        assert head["resources"]["cpu"] == "0" and head["resources"][k8s.DRIVER_RESOURCE] == "1"  # trains nothing ...
        assert head_gpus == (1 if s.use_gpu else None)  # ... and evaluates on its GPU, the driver's
        assert spec.get("entrypointNumGpus", 0) == (1 if s.use_gpu else 0)
        total = group["replicas"] * (limits.get(k8s.GPU) or 0) + (head_gpus or 0)
        assert total == ((s.num_workers * per_trial + 1) if s.use_gpu else 0)
    # scaling overrides reach the manifest
    objs = render(job, "scaling.num_workers=4", "scaling.use_gpu=true", "scaling.cpus_per_worker=6", tmp_path=tmp_path)
    [group] = _ray_job_spec(objs)["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4 and group["resources"] == {"cpu": "6", k8s.GPU: "1"}
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
        assert "USER 1000" in stage and '".[all,postgres]"' in stage


def test_the_images_mlflow_has_the_driver_sqlalchemy_loads_for_the_readmes_database_uri():
    """k8s/base/mlflow.yaml's server opens Secret dsum-mlflow-db's URI, postgresql://… as the README makes it;
    SQLAlchemy (its own dialect lookup, here) loads the driver that URI names by default (psycopg 3 since
    SQLAlchemy 2.1): dsum's postgres extra, which the image installs, must be that driver."""
    import re

    import tomllib
    from sqlalchemy.engine import make_url

    readme = (ROOT / "README.md").read_text()
    uri = re.search(r'--from-literal=uri="(postgresql[^"]*)"', readme).group(1)
    driver = make_url(uri.replace("$PGPASS", "x")).get_dialect().import_dbapi().__name__
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["postgres"]
    assert any(re.match(rf"{driver}\b", req) for req in extra), (driver, extra)


# /etc/passwd's uid-1000 line of each base image, as the images ship it (no image is built here): Ubuntu's
# images have had user ubuntu since 23.04 (nvidia/cuda:*-ubuntu24.04 is built on ubuntu:24.04);
# python:3.12-slim (Debian bookworm) has no user 1000.
BASE_PASSWD = {
    "nvidia/cuda": "root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",
    "python": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
}
_USERADD = """
getent() { grep -q "^[^:]*:[^:]*:$2:" "$PASSWD"; }   # getent passwd UID, on the recorded file
useradd() {                                           # shadow's useradd: exit 4 when the UID is taken
  local uid; while [ $# -gt 0 ]; do [ "$1" = --uid ] && uid=$2; shift; done
  if grep -q "^[^:]*:[^:]*:$uid:" "$PASSWD"; then echo "useradd: UID $uid is not unique" >&2; return 4; fi
  echo "dsum:x:$uid:$uid::/home/dsum:/bin/bash" >> "$PASSWD"
}
"""


@pytest.mark.parametrize("stage", ["gpu", "cpu"])
def test_the_dockerfile_user_step_works_on_its_base_image(stage, tmp_path):
    """The user step of each stage, run with bash against its base image's recorded /etc/passwd and the
    behaviour of getent and useradd (useradd refuses a UID that is taken: the gpu stage once failed so, since
    its CUDA base has user ubuntu with uid 1000). After it, uid 1000 exists, and the stage runs as 1000."""
    text = (ROOT / "Dockerfile").read_text()
    body = next(s for s in text.split("\nFROM ")[1:] if s.split("\n", 1)[0].endswith(f"AS {stage}"))
    base = body.split()[0].split(":")[0]
    passwd = tmp_path / "passwd"
    passwd.write_text(BASE_PASSWD[base])
    [step] = [line.removeprefix("RUN ") for line in body.splitlines() if "useradd" in line]
    run = subprocess.run(["bash", "-ec", _USERADD + step], env={"PASSWD": str(passwd), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert any(line.split(":")[2] == "1000" for line in passwd.read_text().splitlines())
    assert "USER 1000" in body


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


def _rules(s: dict) -> list:
    return s["deletionStrategy"]["deletionRules"]


RULES = {
    "unknown field": (lambda s: s.update(entrypointNumTpus=1), "entrypointNumTpus"),
    "wrong type": (lambda s: s.update(backoffLimit="2"), "backoffLimit"),
    "bad enum": (lambda s: s.update(submissionMode="JobMode"), "submissionMode"),
    "ttl without shutdown": (lambda s: s.update(ttlSecondsAfterFinished=600), "ttlSecondsAfterFinished"),
    "deletion rules with shutdown": (lambda s: s.update(shutdownAfterJobFinishes=True), "deletionRules"),
    "deletion rule twice": (lambda s: _rules(s).append(copy.deepcopy(_rules(s)[0])), "a second DeleteCluster rule"),
    "cluster kept past the job": (
        lambda s: _rules(s)[0]["condition"].update(ttlSeconds=10**7),
        "TTLs must grow DeleteWorkers ≤ DeleteCluster ≤ DeleteSelf",
    ),
    "rule on two statuses": (
        lambda s: _rules(s)[0]["condition"].update(jobDeploymentStatus="Failed"),
        "exactly one of jobStatus and jobDeploymentStatus",
    ),
    "resources twice": (
        lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "4"}),
        "resources in both rayStartParams and resources",
    ),
    "no cluster in interactive mode": (
        lambda s: (s.pop("rayClusterSpec"), s.update(submissionMode="InteractiveMode", backoffLimit=0)),
        "rayClusterSpec / clusterSelector: one of them must be set",
    ),
    "backoff with cluster selector": (
        lambda s: (
            s.pop("rayClusterSpec"),
            s.pop("deletionStrategy"),
            s.update(clusterSelector={"ray.io/cluster": "dsum"}),
        ),
        "clusterSelector",
    ),
    "backoff in interactive mode": (lambda s: s.update(submissionMode="InteractiveMode"), "InteractiveMode"),
    "sidecar with submitter": (lambda s: s.update(submissionMode="SidecarMode"), "SidecarMode"),
    "suspend without shutdown": (lambda s: s.update(suspend=True), "suspend: true needs shutdownAfterJobFinishes"),
    "unknown worker field": (
        lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=1),
        "workerGroupSpecs.0",
    ),
    "start params not strings": (
        lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "rayStartParams.num-cpus",
    ),
    "group resources not strings": (
        lambda s: s["rayClusterSpec"]["headGroupSpec"]["resources"].update({"cpu": 0}),
        "resources.cpu",
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


@pytest.mark.parametrize("kind", sorted(kuberay.NAME_LIMITS))
@pytest.mark.parametrize("name", ["7b-sweep", "Sweep", "sweep_1", "sweep-"])
def test_ray_kinds_need_dns_1035_names(rayjob, kind, name):
    """KubeRay v1.7 refuses a RayCluster, RayJob or RayCronJob whose name is no DNS-1035 label (it starts
    with a digit, has capitals or '_', ends with '-'): ray-operator/controllers/ray/utils/validation.go."""
    spec = {"RayJob": rayjob["spec"], "RayCluster": rayjob["spec"]["rayClusterSpec"],
            "RayCronJob": {"schedule": "0 3 * * *", "jobTemplate": rayjob["spec"]}}[kind]  # fmt: skip
    obj = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    assert any("not a DNS-1035 label" in p for p in kuberay.problems(obj))
    obj["metadata"]["name"] = "sweep-7b"
    assert kuberay.problems(obj) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_job_named_with_a_digit_first_renders_names_the_operator_accepts(mode, tmp_path):
    extra = ["train.eval_steps=10"] if mode != "train" else []
    objs = render(ROOT / "jobs/tiny-dialogsum.yaml", "name=7b-samsum", *extra, *MODES[mode], tmp_path=tmp_path)
    assert validate(objs) == []
    ray_objs = [o for o in objs if o["kind"] in kuberay.SCHEMAS]
    ray_objs += [yaml.safe_load(o["data"]["rayjob.yaml"]) for o in objs if "rayjob.yaml" in o.get("data", {})]
    names = [o["metadata"].get("name") or o["metadata"]["generateName"] for o in ray_objs]
    assert names and all(n.startswith("dsum-7b-samsum-") for n in names), names


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


def test_the_scheduler_may_only_read_and_create_rayjobs(rendered):
    objs = rendered["flan-t5-base-dialogsum-lora", "cronjob"]
    role = next(o for o in objs if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create"]}]
    cron = next(o for o in objs if o["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["schedule"] == "0 3 * * *"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == role["metadata"]["name"]
    assert pod["containers"][0]["command"] == ["bash", f"{k8s.JOB_DIR}/{k8s.SCHEDULE_SCRIPT}"]
    assert pod["containers"][0]["image"] == k8s.KUBECTL_IMAGE  # bash and jq in it since kubernetes#119592


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, says",
    [
        (["--schedule", "*/5 * * * *"], "--schedule '*/5 * * * *': fires more than once a day"),
        (["--schedule", "daily"], "--schedule 'daily': not a cron schedule"),
        (
            ["--sweep", "train.max_steps=30", "train.eval_steps=40"],
            "train.eval_steps (40) is past train.max_steps (30)",
        ),
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

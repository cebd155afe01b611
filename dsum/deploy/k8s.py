"""`dsum k8s render`: a job file as Kubernetes manifests — a RayJob (training or sweep) on a Ray cluster sized
from the job's `scaling` section, or a scheduled sweep (a CronJob that creates the RayJob, or a RayCronJob).

The job itself travels in a ConfigMap that the RayJob's entrypoint reads, so a manifest never drifts from
its job: render again after editing the job. Every pod runs as a non-root user with a read-only root
filesystem, requests and limits; secrets are referenced by name, never contained. What is rendered is
checked before it is returned: the KubeRay schema and operator rules (`kuberay`) and the pod and exposure
rules (`policy`).

On the cluster the driver (the RayJob's entrypoint, on the Ray head) and the workers share one
ReadWriteMany volume, `dsum-storage`, mounted at /mnt/dsum: checkpoints (`scaling.storage_path`), run
directories (`train.output_dir`) and the model cache. A job whose storage path is a URI (s3://, gs://)
keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import re
import textwrap
from typing import Any

import yaml

from dsum import config, rundir
from dsum import sweep as sweep_mod
from dsum.config import JobConfig
from dsum.deploy import kuberay, policy, rules
from dsum.errors import ConfigError, DsumError

RAY_VERSION = "2.60.0"
IMAGE = "dsum"
"""The image's name in manifests (tagged <version>-gpu or -cpu, as the Dockerfile's targets build it);
`--image` or kustomize's `images:` point it at a registry."""
KUBECTL_IMAGE = "registry.k8s.io/kubectl:v1.32.4"
MOUNT, JOB_DIR = "/mnt/dsum", "/etc/dsum"
STORAGE_CLAIM = "dsum-storage"
MLFLOW_URI = "http://dsum-mlflow:5000"
"""The MLflow server of k8s/base (a ClusterIP Service in the same namespace)."""
SECRETS = {  # variable: (secret, key); each optional: a pod starts without it
    "HF_TOKEN": ("dsum-hub-token", "token"),
    "MLFLOW_TRACKING_USERNAME": ("dsum-mlflow-auth", "username"),
    "MLFLOW_TRACKING_PASSWORD": ("dsum-mlflow-auth", "password"),
}
UID = 1000
GPU = "nvidia.com/gpu"
DRIVER_RESOURCE = "dsum-driver"
"""A Ray resource only the head has: the RayJob's entrypoint asks for it, so the driver runs on the head."""
MIN_WORKER_MEMORY = 2**30
RUN_SCRIPT, SCHEDULE_SCRIPT = "run.sh", "schedule.sh"
"""The RayJob's entrypoint (`bash /etc/dsum/run.sh`) and the CronJob's tick, shipped in ConfigMaps."""
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SCHEDULE_LABEL = "dsum/schedule"
CLUSTER_GRACE_S = 600
"""A finished RayJob's Ray cluster is deleted this long after the end (its dashboard and logs meanwhile)."""
HISTORY_S = 7 * 24 * 3600
"""A finished RayJob (and its submitter Job) is deleted this long after the end."""
RAYCRONJOB_GATE = (
    "RayCronJob is alpha in KubeRay v1.7 and off by default: the operator runs its controller only with the "
    "feature gate on (Helm: -f k8s/operator/values.yaml; kustomize install: --feature-gates=RayCronJob=true). "
    "Without it the object is accepted and never fires; once it fires, `kubectl get raycronjob NAME` shows "
    "LAST SCHEDULE and `kubectl get rayjobs -l ray.io/cronjob-name=NAME` lists the runs."
)


@dataclasses.dataclass(frozen=True)
class Options:
    sweep: bool = False
    schedule: str | None = None  # cron: a scheduled sweep
    time_zone: str = "Etc/UTC"
    via: str = "cronjob"  # or "raycronjob"
    image: str | None = None
    trials_at_once: int | None = None
    deadline_hours: float = 24.0
    worker_memory: str | None = None
    namespace: str | None = None
    queue: str | None = None  # a Kueue LocalQueue: the RayJob waits, suspended, until Kueue admits all of it


def render(job: JobConfig, job_file: str, opts: Options) -> list[dict[str, Any]]:
    """The manifests of a job, checked (one `DsumError` line for anything KubeRay or the pod rules reject)."""
    check_options(opts)
    if not re.search(r"[a-z0-9]", job.name.lower()):
        raise ConfigError(f"{job_file}: name: {job.name!r} has no letter or digit to make Kubernetes names of; "
                          "set name=... (lowercase letters, digits and '-')")  # fmt: skip
    sweep = opts.sweep or opts.schedule is not None
    if sweep:
        sweep_mod.check(job, job_file)  # what would stop the sweep on the cluster stops the render
    kind = "sweep" if sweep else "train"
    limit = kuberay.NAME_LIMITS["RayCronJob" if opts.via == "raycronjob" and opts.schedule else "RayJob"]
    name = k8s_name(f"{job.name}-{kind}", limit, dns1035=True)
    on_cluster = cluster_job(job, job_file, name, sweep, opts)
    files = {"job.yaml": _job_yaml(on_cluster, job_file), RUN_SCRIPT: run_script(on_cluster, name, kind, opts)}
    job_map = _config_map(f"{name}-job", files, job, kind)
    spec = _ray_job_spec(on_cluster, job_map["metadata"]["name"], sweep, opts)
    labels = _labels(job, kind)
    if opts.schedule is None:
        objs = [job_map, _obj(kuberay.API_VERSION, "RayJob", name, labels | _queue(opts), spec=spec)]
    elif opts.via == "raycronjob":
        cron = {"schedule": opts.schedule, "timeZone": opts.time_zone, "jobTemplate": spec}
        objs = [job_map, _obj(kuberay.API_VERSION, "RayCronJob", name, labels, spec=cron)]
    else:
        objs = [job_map, *_cron_job(job, name, spec, labels, opts)]
    if opts.namespace:
        for obj in objs:
            obj["metadata"]["namespace"] = opts.namespace
    check(objs)
    return objs


def header(job_file: str, opts: Options) -> str:
    """The comment a rendered file opens with."""
    text = f"# rendered from {job_file} by `dsum k8s render`; render again after editing the job\n"
    if opts.schedule is not None and opts.via == "raycronjob":
        text += "".join(f"# {line}\n" for line in textwrap.wrap(RAYCRONJOB_GATE, 110))
    return text


def check(objs: list[dict[str, Any]]) -> None:
    """KubeRay's schema and rules on every Ray kind inside `objs` (a CronJob's RayJob too), and `policy`."""
    found = policy.violations(objs)
    for obj in objs:
        if obj.get("kind") in kuberay.SCHEMAS:
            found += kuberay.problems(obj)
        for inner in _embedded(obj):
            found += kuberay.problems(inner) + policy.violations([inner])
    if found:
        raise DsumError(f"the rendered manifests would be rejected: {found[0]}")


def _embedded(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """RayJobs a ConfigMap carries for a CronJob to create."""
    if obj.get("kind") != "ConfigMap":
        return []
    return [yaml.safe_load(text) for key, text in obj.get("data", {}).items() if key == "rayjob.yaml"]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a job file in a ConfigMap) as literal blocks, readable in `kubectl get -o yaml`."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def to_yaml(objs: list[dict[str, Any]], header: str = "") -> str:
    return header + "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objs)


# ---------------------------------------------------------------------------------------------- the job


def cluster_job(job: JobConfig, job_file: str, name: str, sweep: bool, opts: Options) -> JobConfig:
    """The job as it runs on the cluster: run directories and checkpoints on the shared volume, a fixed run
    name (a RayJob retried on a new cluster resumes the run), and for a sweep the trials the cluster holds."""
    raw = copy.deepcopy(job.to_dict())
    storage = job.scaling.storage_path
    if not (storage and "://" in storage):
        raw["scaling"]["storage_path"] = f"{MOUNT}/ray"
    raw["train"]["output_dir"] = f"{MOUNT}/runs"
    raw["train"]["run_name"] = job.train.run_name or name
    if sweep:
        raw["tune"]["max_concurrent_trials"] = trials_at_once(job, opts)
    try:
        return config.from_dict(raw, source=job_file)
    except ConfigError as e:
        raise DsumError(f"on the cluster: {e}") from None


def trials_at_once(job: JobConfig, opts: Options) -> int:
    return min(opts.trials_at_once or job.tune.max_concurrent_trials or 2, job.tune.num_samples)


def _job_yaml(job: JobConfig, job_file: str) -> str:
    head = (
        f"# {job_file}, as it runs on the cluster (rendered by `dsum k8s render`; edit the job file and render again)\n"
    )
    return head + yaml.safe_dump(job.to_dict(), sort_keys=False, width=120)


def _entrypoint() -> str:
    """One command. KubeRay pastes spec.entrypoint unquoted into its submitter's shell line, after
    `ray job submit ... --` (common/job.go, BuildJobSubmitCommand, v1.7): a shell list there (a && b) would
    be split by the submitter's own shell, and only its first command would become the Ray job."""
    return f"bash {JOB_DIR}/{RUN_SCRIPT}"


def run_script(job: JobConfig, name: str, kind: str, opts: Options) -> str:
    """The Ray job's script: fetch the base model and data into the shared cache, then train or sweep; a
    scheduled sweep first takes its schedule's lease, names its run by the UTC date, and trains and registers
    the best configuration as a version that waits for `dsum promote`."""
    path = f"{JOB_DIR}/job.yaml"
    what = "the scheduled sweep" if opts.schedule else "RayJob"
    lines = [
        "#!/usr/bin/env bash",
        f"# The entrypoint of {what} {name} (dsum k8s render), run on the Ray head as `bash /etc/dsum/run.sh`.",
        "set -euo pipefail",
        f"job={path}",
    ]
    fetch = ["# the base model and hub data into the Hugging Face cache on the shared volume, once, before any",
             "# worker (or trial) starts: they find it there instead of each downloading it",
             'dsum fetch "$job"']  # fmt: skip
    if opts.schedule is None:
        return "\n".join([*lines, *fetch, f'exec dsum {"tune" if kind == "sweep" else "train"} "$job"']) + "\n"
    out, deadline = job.train.output_dir, int(opts.deadline_hours * 3600)
    lines += [
        "# one sweep a day, named by its UTC date: a retry of the same day's RayJob resumes it",
        f'run="{job.train.run_name}-$(date -u +%Y%m%d)"',
        "# One scheduled sweep at a time. The lease is a directory on the shared volume, built whole beside it",
        "# and renamed into place: rename(2) is atomic there (NFS included) and fails onto a lease that exists,",
        "# so no run ever sees a lease without its holder and start time. One older than the RayJob's",
        "# activeDeadlineSeconds was left by a run KubeRay stopped.",
        f'mkdir -p {out}; lease={out}/.{name}.lease; mine="$lease.$HOSTNAME.$$"',
        'rm -rf "$mine"; mkdir "$mine"; echo "$run" > "$mine/run"; date -u +%s > "$mine/since"',
        'if ! mv -T "$mine" "$lease" 2>/dev/null; then',
        '  holder=$(cat "$lease/run" 2>/dev/null || echo "?"); since=$(cat "$lease/since" 2>/dev/null || true)',
        "  # (a lease with no readable start time is as old as its directory: bash would count an empty one as 0)",
        '  case "$since" in ""|*[!0-9]*) since=$(stat -c %Y "$lease" 2>/dev/null || date -u +%s) ;; esac',
        f'  if [ "$holder" != "$run" ] && [ $(( $(date -u +%s) - since )) -lt {deadline} ]; then',
        '    rm -rf "$mine"',
        '    echo "dsum: the previous scheduled sweep ($holder) is still running; not starting another"',
        "    exit 0",
        "  fi",
        '  echo "dsum: taking over the lease of $holder (the same run retried, or a run past its deadline)"',
        '  mv -f "$mine/run" "$lease/run"; mv -f "$mine/since" "$lease/since"; rm -rf "$mine"',
        "fi",
        """trap 'rm -rf "$lease"' EXIT; trap 'exit 143' TERM; trap 'exit 130' INT""",
        *fetch,
        'dsum tune "$job" train.run_name="$run"',
        f'dsum train {out}/"$run"/{rundir.BEST} train.run_name="$run-best" tracking.first_champion=false',
    ]
    return "\n".join(lines) + "\n"


def check_options(opts: Options) -> None:
    """Each option by the rule Kubernetes (or KubeRay) applies to the field it becomes (dsum.deploy.rules):
    one ConfigError naming the flag, before anything is rendered or written."""

    def fail(flag: str, value: Any, why: str) -> None:
        raise ConfigError(f"{flag} {value!r}: {why}")

    if opts.namespace is not None and (why := rules.dns_label(opts.namespace)):
        fail("--namespace", opts.namespace, f"not a namespace name: {why}")
    if opts.image is not None and (why := rules.image(opts.image)):
        fail("--image", opts.image, why)
    if opts.worker_memory is not None:
        amount = rules.quantity_bytes(opts.worker_memory)
        if amount is None:
            fail("--worker-memory", opts.worker_memory, "not a Kubernetes quantity (e.g. 16Gi, 64G, 48000Mi)")
        if amount < MIN_WORKER_MEMORY:
            fail("--worker-memory", opts.worker_memory, "less than 1Gi: a Ray worker pod's own processes need more")
    if opts.queue is not None:
        if why := rules.label_value(opts.queue) if opts.queue else "must not be empty":
            fail("--queue", opts.queue, f"not a Kueue queue name: {why}")
        if opts.schedule is not None and opts.via == "raycronjob":
            fail("--queue", opts.queue, "a RayCronJob can't label the RayJobs it creates (KubeRay v1.7 sets only "
                 "ray.io/cronjob-name), so Kueue would never admit them: use --via cronjob")  # fmt: skip
    if opts.trials_at_once is not None and opts.trials_at_once < 1:
        fail("--trials-at-once", opts.trials_at_once, "must be at least 1")
    seconds = opts.deadline_hours * 3600
    if not (math.isfinite(seconds) and 1 <= seconds < 2**63):
        fail("--deadline-hours", opts.deadline_hours, "must be a positive number of hours (activeDeadlineSeconds ≥ 1)")
    if why := rules.time_zone(opts.time_zone):
        fail("--time-zone", opts.time_zone, why)
    if opts.schedule is not None:
        if why := rules.cron(opts.schedule):
            fail("--schedule", opts.schedule, why)
        minute, hour = opts.schedule.split()[:2]
        if not (minute.isdigit() and hour.isdigit()):
            fail(
                "--schedule",
                opts.schedule,
                "fires more than once a day; a scheduled sweep is named by its date (a retry the same day resumes "
                "it), so give the minute and the hour as numbers, e.g. '0 3 * * *'",
            )


# ------------------------------------------------------------------------------------------- Ray kinds


def _ray_job_spec(job: JobConfig, job_map: str, sweep: bool, opts: Options) -> dict[str, Any]:
    s = job.scaling
    groups = trials_at_once(job, opts) if sweep else 1
    spec: dict[str, Any] = {
        "entrypoint": _entrypoint(),
        # the driver runs on the head, which holds the job file (and, for GPU jobs, the evaluation's GPU)
        "entrypointResources": json.dumps({DRIVER_RESOURCE: 1}),
        "activeDeadlineSeconds": int(opts.deadline_hours * 3600),
        "backoffLimit": 2,  # each retry is a new cluster; the run resumes from the shared volume
        "submissionMode": "K8sJobMode",
        "submitterConfig": {"backoffLimit": 2},
        "submitterPodTemplate": _pod_template(
            _labels(job, "submitter"),
            _container("ray-job-submitter", opts, s.use_gpu, {"cpu": "200m", "memory": "512Mi"}, env=False),
            volumes=False,
        ),
        "rayClusterSpec": ray_cluster_spec(job, job_map, s.num_workers * groups, opts),
    }
    spec |= _cleanup(opts)
    if s.use_gpu:
        spec["entrypointNumGpus"] = 1
    return spec


def _cleanup(opts: Options) -> dict[str, Any]:
    """How a finished RayJob goes away. KubeRay v1.7's deletion rules (the RayJobDeletionPolicy gate is on by
    default): the cluster CLUSTER_GRACE_S after the end, the RayJob and its submitter Job HISTORY_S after it,
    whether the Ray job succeeded or failed, or the RayJob never got that far (jobDeploymentStatus Failed: a
    deadline passed, submission failed). A queued RayJob must be suspendable, which needs
    shutdownAfterJobFinishes, and the operator refuses deletion rules beside it: there the cluster goes after
    the TTL, and the RayJob stays (a CronJob's tick deletes its own old ones)."""
    if opts.queue is not None:
        return {"suspend": True, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": CLUSTER_GRACE_S}
    conditions = [{"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}]
    rules = [
        {"policy": policy, "condition": condition | {"ttlSeconds": ttl}}
        for condition in conditions
        for policy, ttl in (("DeleteCluster", CLUSTER_GRACE_S), ("DeleteSelf", HISTORY_S))
    ]
    return {"deletionStrategy": {"deletionRules": rules}}


def ray_cluster_spec(job: JobConfig, job_map: str | None, workers: int, opts: Options) -> dict[str, Any]:
    """A cluster for one job: a head that trains nothing (the driver runs there: with one GPU when the job
    uses GPUs, for the evaluation after training), and `workers` workers of the job's shape."""
    s = job.scaling
    head_limits = {"cpu": "4", "memory": "32Gi", GPU: 1} if s.use_gpu else {"cpu": "2", "memory": "8Gi"}
    head = _container("ray-head", opts, s.use_gpu, head_limits, job_map=job_map)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    worker_cpus = s.worker_cpus()  # auto: 1 (the driver joins this cluster)
    worker_limits: dict[str, Any] = {"cpu": _cpu(worker_cpus + 1), "memory": opts.worker_memory or _memory(job)}
    if s.use_gpu:
        worker_limits[GPU] = 1
    worker = _container("ray-worker", opts, s.use_gpu, worker_limits, job_map=job_map)
    # Ray resources through each group's `resources` (KubeRay v1.7): the operator turns them into `ray start`
    # flags itself (common/pod.go, updateRayStartParamsResources: cpu → --num-cpus, nvidia.com/gpu →
    # --num-gpus, any other name → --resources='{json}'), quantities as strings.
    worker_resources = {"cpu": _cpu(worker_cpus)} | {k: f"{v:g}" for k, v in s.resources_per_worker.items()}
    head_resources = {"cpu": "0", DRIVER_RESOURCE: "1"}  # no training worker lands on the head; the driver does
    if s.use_gpu:
        worker_resources[GPU] = "1"
        head_resources[GPU] = "1"  # the driver's, for evaluation
    group = "gpu" if s.use_gpu else "cpu"
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "resources": head_resources,
            "template": _pod_template(_labels(job, "head"), head, gpu=s.use_gpu, job_map=job_map),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "resources": worker_resources,
                "template": _pod_template(_labels(job, "worker"), worker, gpu=s.use_gpu, job_map=job_map),
            }
        ],
    }  # fmt: skip


def _memory(job: JobConfig) -> str:
    """Host memory per worker: a GPU worker loads the base model through host memory first."""
    return "48Gi" if job.scaling.use_gpu else f"{max(4, int(4 * job.scaling.worker_cpus()))}Gi"


def _cpu(n: float) -> str:
    return f"{n:g}" if float(n).is_integer() else f"{int(n * 1000)}m"


# ------------------------------------------------------------------------------------------------ pods


def security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context(uid: int = UID) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def default_image(gpu: bool) -> str:
    try:
        version = importlib.metadata.version("dsum")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return f"{IMAGE}:{version}-{'gpu' if gpu else 'cpu'}"


def _container(
    name: str, opts: Options, gpu: bool, limits: dict[str, Any], job_map: str | None = None, env: bool = True
) -> dict[str, Any]:
    """One container; `gpu`: the job's image is the GPU build (every pod of a GPU job runs it)."""
    c: dict[str, Any] = {"name": name, "image": opts.image or default_image(gpu), "imagePullPolicy": "IfNotPresent"}
    if env:
        c["env"] = _env()
        c["volumeMounts"] = [
            {"name": "storage", "mountPath": MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]
        if job_map:
            c["volumeMounts"].append({"name": "job", "mountPath": JOB_DIR, "readOnly": True})
    else:
        c["env"] = [{"name": "HOME", "value": "/tmp"}]
        c["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    c["resources"] = {"requests": dict(limits), "limits": dict(limits)}  # requests = limits: Guaranteed QoS
    c["securityContext"] = security_context()
    return c


def _env() -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        {"name": "HF_HOME", "value": f"{MOUNT}/hf"},  # models download once for every pod
        {"name": "DSUM_CACHE", "value": f"{MOUNT}/cache"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW_URI},  # a job's tracking.tracking_uri wins over it
    ]
    for var, (secret, key) in SECRETS.items():
        env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    return env


def _pod_template(
    labels: dict[str, str],
    container: dict[str, Any],
    gpu: bool = False,
    job_map: str | None = None,
    volumes: bool = True,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"securityContext": pod_security_context(), "containers": [container]}
    vols: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if volumes:
        vols += [
            {"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # Ray's object store and torch's shared memory
        ]
    if job_map:
        vols.append({"name": "job", "configMap": {"name": job_map}})
    spec["volumes"] = vols
    if not volumes:  # the submitter: a Kubernetes Job's pod
        spec["restartPolicy"] = "Never"
    if gpu:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels}, "spec": spec}


# -------------------------------------------------------------------------------------------- schedule


def _cron_job(
    job: JobConfig, name: str, spec: dict[str, Any], labels: dict[str, str], opts: Options
) -> list[dict[str, Any]]:
    """A plain Kubernetes CronJob whose tick creates the RayJob: portable (no feature gate). Its tick first
    looks for this schedule's RayJobs that are still under way and creates none while one is (the CronJob's
    concurrencyPolicy guards only the tick's own seconds-long pod; a sweep may run a day). Its ServiceAccount
    may read and create RayJobs in the namespace (and delete them, for queued ones) and nothing else."""
    account = k8s_name(f"{name}-scheduler", 63)
    schedule = {SCHEDULE_LABEL: k8s_name(name, 63)}
    ray_job = _obj(kuberay.API_VERSION, "RayJob", None, labels | schedule | _queue(opts), spec=spec)
    ray_job["metadata"]["generateName"] = k8s_name(name, kuberay.NAME_LIMITS["RayJob"] - 6, dns1035=True) + "-"
    files = {"rayjob.yaml": to_yaml([ray_job]), SCHEDULE_SCRIPT: schedule_script(name, schedule, opts)}
    rayjob_map = _config_map(f"{name}-rayjob", files, job, "sweep")
    container = {
        "name": "create-rayjob",
        "image": KUBECTL_IMAGE,
        "command": ["bash", f"{JOB_DIR}/{SCHEDULE_SCRIPT}"],
        "volumeMounts": [{"name": "rayjob", "mountPath": JOB_DIR, "readOnly": True}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
        "securityContext": security_context(),
    }
    pod = {
        "serviceAccountName": account,
        "restartPolicy": "Never",
        "securityContext": pod_security_context(65532),
        "containers": [container],
        "volumes": [{"name": "rayjob", "configMap": {"name": rayjob_map["metadata"]["name"]}}],
    }
    cron = {
        "schedule": opts.schedule,
        "timeZone": opts.time_zone,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 600,  # a tick missed by more than this is skipped, not run late
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {
            "spec": {"backoffLimit": 2, "activeDeadlineSeconds": 300, "template": {"metadata": {"labels": labels}, "spec": pod}}
        },
    }  # fmt: skip
    verbs = ["get", "list", "create"] + (["delete"] if opts.queue is not None else [])
    return [
        rayjob_map,
        _obj("v1", "ServiceAccount", account, labels),
        _obj(
            "rbac.authorization.k8s.io/v1",
            "Role",
            account,
            labels,
            rules=[{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": verbs}],
        ),
        _obj(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            account,
            labels,
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            subjects=[{"kind": "ServiceAccount", "name": account}],
        ),
        _obj("batch/v1", "CronJob", k8s_name(name, 52), labels, spec=cron),
    ]


def schedule_script(name: str, schedule: dict[str, str], opts: Options) -> str:
    """The CronJob's tick, in registry.k8s.io/kubectl (which ships bash and jq since kubernetes#119592):
    no new RayJob while one of this schedule's is under way. KubeRay v1.7 ends a RayJob in
    jobDeploymentStatus Complete or Failed (apis/ray/v1/rayjob_types.go, IsJobDeploymentTerminal); any other
    status (New, Initializing, Running, Suspended while Kueue queues it, Retrying, ...) means it runs or will."""
    selector = ",".join(f"{k}={v}" for k, v in schedule.items())
    lines = [
        "#!/usr/bin/env bash",
        f"# The tick of CronJob {name} (dsum k8s render): a RayJob from rayjob.yaml, unless one still runs.",
        "set -euo pipefail",
        f'rayjobs=$(kubectl get rayjobs -l "{selector}" -o json)',
        """running=$(jq -r '[.items[] | select((.status.jobDeploymentStatus // "") | IN("Complete", "Failed") """
        """| not) | .metadata.name] | join(", ")' <<<"$rayjobs")""",
        'if [ -n "$running" ]; then',
        '  echo "dsum: the previous scheduled sweep is still running ($running); not starting another"',
        "  exit 0",
        "fi",
    ]
    if opts.queue is not None:  # queued RayJobs can't carry deletion rules (see _cleanup): old ones go here
        lines += [
            f"# finished RayJobs of this schedule, {HISTORY_S // 86400} days after their end",
            """jq -r --argjson now "$(date -u +%s)" '.items[] | select(.status.jobDeploymentStatus | """
            """IN("Complete", "Failed")) | select(((.status.endTime // .metadata.creationTimestamp) """
            f"""| fromdateiso8601) < $now - {HISTORY_S}) | .metadata.name' <<<"$rayjobs" | while read -r old; do""",
            '  kubectl delete rayjob "$old"',
            "done",
        ]
    lines.append(f"kubectl create -f {JOB_DIR}/rayjob.yaml")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- helpers


def k8s_name(text: str, limit: int, dns1035: bool = False) -> str:
    """A DNS-1123 name of at most `limit` characters (long ones keep a hash of the whole); with `dns1035`, one
    that starts with a letter, as KubeRay requires of Ray kinds (a job named 7b-... becomes dsum-7b-...)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "dsum"
    if dns1035 and not name[0].isalpha():
        name = f"dsum-{name}"
    if len(name) > limit:
        digest = hashlib.sha256(name.encode()).hexdigest()[:6]
        name = name[: limit - 7].rstrip("-") + "-" + digest
    return name


def _labels(job: JobConfig, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dsum",
        "app.kubernetes.io/part-of": "dsum",
        "app.kubernetes.io/component": component,
        "dsum/job": k8s_name(job.name, 63),
    }


def _queue(opts: Options) -> dict[str, str]:
    return {QUEUE_LABEL: opts.queue} if opts.queue is not None else {}


def _config_map(name: str, data: dict[str, str], job: JobConfig, kind: str) -> dict[str, Any]:
    return _obj("v1", "ConfigMap", k8s_name(name, 63), _labels(job, kind), data=data)


def _obj(api: str, kind: str, name: str | None, labels: dict[str, str], **body: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name} if name else {}
    return {"apiVersion": api, "kind": kind, "metadata": meta | {"labels": dict(labels)}, **body}

"""The KubeRay v1.7 kinds dsum writes (RayCluster, RayJob, RayCronJob; `ray.io/v1`), as a JSON Schema of
their field names, and the rules the operator enforces that its CRD schema does not show.

The schema holds the fields of KubeRay's API reference that dsum uses or a user is likely to add, and no
others: an unknown field, a wrong type or an unknown enum value fails here instead of being dropped
silently by the API server's pruning. Pod templates (`template`, `submitterPodTemplate`) are Kubernetes
`PodTemplateSpec`s; the tests check them against the Kubernetes schemas (kubernetes-validate).
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

API_VERSION = "ray.io/v1"
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
"""Longest names the operator accepts: it derives the names of Services, Jobs and RayJobs from them."""


def _obj(required: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR, _BOOL = {"type": "string"}, {"type": "boolean"}
_INT = {"type": "integer"}
_POS, _NONNEG = {"type": "integer", "minimum": 1}, {"type": "integer", "minimum": 0}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY_OBJ = {"type": "object"}  # a Kubernetes type (checked against the Kubernetes schemas by the tests)
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}
_QUANTITY = {"type": ["string", "integer"]}
_RESOURCES = _obj(limits={"type": "object", "additionalProperties": _QUANTITY}, requests={"type": "object"})
_METADATA = {
    "type": "object",
    "properties": {"name": _STR, "generateName": _STR, "namespace": _STR, "labels": _MAP, "annotations": _MAP},
    "additionalProperties": False,
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # ray start flags, all strings

_GROUP_RESOURCES = {"type": "object", "additionalProperties": {"type": "string"}}  # name → quantity (v1.7)
_HEAD = _obj(
    ("template",),
    rayStartParams=_START_PARAMS,
    resources=_GROUP_RESOURCES,
    labels=_MAP,
    template=_POD_TEMPLATE,
    serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    enableIngress=_BOOL,
    headService=_ANY_OBJ,
)
_WORKER = _obj(
    ("groupName", "template"),
    groupName=_STR,
    replicas=_NONNEG,
    minReplicas=_NONNEG,
    maxReplicas=_NONNEG,
    idleTimeoutSeconds=_NONNEG,
    numOfHosts=_POS,
    suspend=_BOOL,
    rayStartParams=_START_PARAMS,
    resources=_GROUP_RESOURCES,
    labels=_MAP,
    template=_POD_TEMPLATE,
    scaleStrategy=_obj(workersToDelete={"type": "array", "items": _STR}),
)
_AUTOSCALER = _obj(
    resources=_RESOURCES,
    image=_STR,
    imagePullPolicy={"enum": ["Always", "IfNotPresent", "Never"]},
    securityContext=_ANY_OBJ,
    env={"type": "array"},
    envFrom={"type": "array"},
    volumeMounts={"type": "array"},
    idleTimeoutSeconds=_NONNEG,
    upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
    version={"enum": ["v1", "v2"]},
)
RAY_CLUSTER_SPEC = _obj(
    ("headGroupSpec",),
    rayVersion=_STR,
    authOptions=_obj(mode={"enum": ["disabled", "token"]}, secretName=_STR),
    enableInTreeAutoscaling=_BOOL,
    autoscalerOptions=_AUTOSCALER,
    headGroupSpec=_HEAD,
    workerGroupSpecs={"type": "array", "items": _WORKER},
    headServiceAnnotations=_MAP,
    suspend=_BOOL,
    managedBy=_STR,
    gcsFaultToleranceOptions=_ANY_OBJ,
)
RAY_JOB_SPEC = _obj(
    ("entrypoint",),
    entrypoint=_STR,
    jobId=_STR,
    metadata=_MAP,
    runtimeEnvYAML=_STR,
    rayClusterSpec=RAY_CLUSTER_SPEC,
    clusterSelector=_MAP,
    shutdownAfterJobFinishes=_BOOL,
    ttlSecondsAfterFinished=_NONNEG,
    activeDeadlineSeconds=_POS,
    preRunningDeadlineSeconds=_POS,
    backoffLimit=_NONNEG,
    submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    submitterPodTemplate=_POD_TEMPLATE,
    submitterConfig=_obj(backoffLimit=_NONNEG),
    deletionStrategy=_obj(
        deletionRules={
            "type": "array",
            "items": _obj(
                ("policy", "condition"),
                policy={"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
                condition=_obj(
                    jobStatus={"enum": ["SUCCEEDED", "FAILED"]},
                    jobDeploymentStatus={"enum": ["Failed"]},
                    ttlSeconds=_NONNEG,
                ),
            ),
        }
    ),
    suspend=_BOOL,
    entrypointNumCpus={"type": "number", "minimum": 0},
    entrypointNumGpus={"type": "number", "minimum": 0},
    entrypointResources=_STR,
    managedBy=_STR,
)
RAY_CRON_JOB_SPEC = _obj(
    ("schedule", "jobTemplate"),
    schedule=_STR,
    jobTemplate=RAY_JOB_SPEC,
    suspend=_BOOL,
    timeZone=_STR,
)
SCHEMAS = {
    kind: _obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": API_VERSION}, kind={"const": kind},
               metadata=_METADATA, spec=spec)
    for kind, spec in (("RayCluster", RAY_CLUSTER_SPEC), ("RayJob", RAY_JOB_SPEC), ("RayCronJob", RAY_CRON_JOB_SPEC))
}  # fmt: skip


def problems(obj: dict[str, Any]) -> list[str]:
    """What KubeRay would reject in a RayCluster, RayJob or RayCronJob: schema errors (each with its field
    path), then the operator's own rules. Empty when the object is fine."""
    kind = obj.get("kind")
    if kind not in SCHEMAS:
        return [f"not a KubeRay kind: {kind!r}"]
    name = obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get("generateName", "")
    found = [
        f"{kind} {name}: {'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(jsonschema.Draft202012Validator(SCHEMAS[kind]).iter_errors(obj), key=lambda e: e.path)
    ]
    if found:
        return found
    found += [f"{kind} {name}: metadata.name: {p}" for p in name_problems(kind, obj["metadata"])]
    for where, job in job_specs(obj):
        found += [f"{kind} {name}: {where}.{p}" for p in job_rule_problems(job)]
    for where, cluster in clusters(obj):
        found += [f"{kind} {name}: {where}.{p}" for p in cluster_rule_problems(cluster)]
    return found


_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def name_problems(kind: str, metadata: dict[str, Any]) -> list[str]:
    """ray-operator/controllers/ray/utils/validation.go (v1.7): ValidateRayClusterMetadata,
    ValidateRayJobMetadata, ValidateRayCronJobSpec: at most NAME_LIMITS[kind] characters, and a DNS-1035 label
    (apimachinery's IsDNS1035Label: a lowercase letter first, then lowercase letters, digits and '-', a letter
    or digit last). A generateName gets five random characters from the API server."""
    if "generateName" in metadata and "name" not in metadata:
        name, limit = metadata["generateName"] + "x" * 5, NAME_LIMITS[kind]
    else:
        name, limit = metadata.get("name", ""), NAME_LIMITS[kind]
    out = []
    if len(name) > limit:
        out.append(f"longer than {limit - (5 if 'generateName' in metadata else 0)} characters")
    if not _DNS1035.fullmatch(name):
        out.append(f"{name!r} is not a DNS-1035 label (a lowercase letter first, then lowercase letters, digits, '-')")
    return out


def job_rule_problems(spec: dict[str, Any]) -> list[str]:
    """The RayJob rules KubeRay's controller enforces and its CRD schema accepts (validation.go v1.7,
    ValidateRayJobSpec and validateDeletionConfiguration)."""
    out = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = "clusterSelector" in spec
    rules = spec.get("deletionStrategy", {}).get("deletionRules") or []
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        out.append("ttlSecondsAfterFinished: > 0 needs shutdownAfterJobFinishes: true")
    if rules and shutdown:
        out.append("deletionStrategy.deletionRules: can't be used together with shutdownAfterJobFinishes")
    if spec.get("backoffLimit", 0) > 0 and selector:
        out.append("backoffLimit: > 0 can't be used with clusterSelector (a retry creates a new cluster)")
    if spec.get("backoffLimit", 0) > 0 and mode == "InteractiveMode":
        out.append("backoffLimit: > 0 can't be used with submissionMode InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        out.append("submissionMode: SidecarMode can't be used with submitterPodTemplate or submitterConfig")
    if spec.get("suspend") and not shutdown:
        out.append("suspend: true needs shutdownAfterJobFinishes: true")
    if spec.get("suspend") and selector:
        out.append("suspend: the clusterSelector mode can't be suspended")
    if "rayClusterSpec" not in spec and not selector:  # in every submission mode
        out.append("rayClusterSpec / clusterSelector: one of them must be set")
    out += [f"deletionStrategy.{p}" for p in _deletion_rule_problems(rules, selector)]
    return out


def _deletion_rule_problems(rules: list[dict[str, Any]], selector: bool) -> list[str]:
    """validateDeletionRules: one rule per (condition, policy); no DeleteCluster/DeleteWorkers with a
    clusterSelector; for each condition the TTLs grow along DeleteWorkers ≤ DeleteCluster ≤ DeleteSelf."""
    out, seen = [], {}
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            out.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus")
            continue
        if selector and rule["policy"] in ("DeleteCluster", "DeleteWorkers"):
            out.append(f"deletionRules[{i}]: {rule['policy']} is not supported with clusterSelector")
            continue
        key = condition.get("jobStatus") or f"deployment {condition['jobDeploymentStatus']}"
        if rule["policy"] in seen.setdefault(key, {}):
            out.append(f"deletionRules[{i}]: a second {rule['policy']} rule for {key}")
            continue
        seen[key][rule["policy"]] = condition.get("ttlSeconds", 0)
    for key, ttls in seen.items():
        order = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
        if order != sorted(order):
            out.append(f"deletionRules: for {key} the TTLs must grow DeleteWorkers ≤ DeleteCluster ≤ DeleteSelf")
    return out


def cluster_rule_problems(spec: dict[str, Any]) -> list[str]:
    """validateRayGroupResources (validation.go v1.7): a group's resources in rayStartParams or in its
    `resources` field, not both."""
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    out = []
    for where, group in groups:
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            out.append(f"{where}: resources in both rayStartParams and resources; use only one")
    return out


def job_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, RayJob spec) inside a KubeRay object: a RayJob's own, a RayCronJob's template, none else."""
    spec = obj.get("spec", {})
    if obj.get("kind") == "RayJob":
        return [("spec", spec)]
    if obj.get("kind") == "RayCronJob":
        return [("spec.jobTemplate", spec.get("jobTemplate", {}))]
    return []


def clusters(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) inside a KubeRay object: a RayCluster's own, or a RayJob's rayClusterSpec."""
    if obj.get("kind") == "RayCluster":
        return [("spec", obj.get("spec", {}))]
    return [
        (f"{where}.rayClusterSpec", job["rayClusterSpec"]) for where, job in job_specs(obj) if "rayClusterSpec" in job
    ]


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template inside a KubeRay object."""
    out = [(f"{where}.submitterPodTemplate", job["submitterPodTemplate"])
           for where, job in job_specs(obj) if "submitterPodTemplate" in job]  # fmt: skip
    for where, cluster in clusters(obj):
        out.append((f"{where}.headGroupSpec.template", cluster.get("headGroupSpec", {}).get("template", {})))
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            out.append((f"{where}.workerGroupSpecs[{i}].template", group.get("template", {})))
    return out

"""The KubeRay v1.7 kinds dsum writes (RayCluster, RayJob, RayCronJob; `ray.io/v1`), as a JSON Schema of
their field names, and the rules the operator enforces that its CRD schema does not show.

The schema holds the fields of KubeRay's API reference that dsum uses or a user is likely to add, and no
others: an unknown field, a wrong type or an unknown enum value fails here instead of being dropped
silently by the API server's pruning. Pod templates (`template`, `submitterPodTemplate`) are Kubernetes
`PodTemplateSpec`s; the tests check them against the Kubernetes schemas (kubernetes-validate).
"""

from __future__ import annotations

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

_HEAD = _obj(
    ("template",),
    rayStartParams=_START_PARAMS,
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
                condition=_obj(jobStatus={"enum": ["SUCCEEDED", "FAILED"]}, ttlSeconds=_NONNEG),
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
    limit = NAME_LIMITS[kind] - (5 if "generateName" in obj["metadata"] else 0)  # generateName adds 5 characters
    if len(name) > limit:
        found.append(f"{kind} {name}: metadata.name: longer than {limit} characters")
    for where, job in job_specs(obj):
        found += [f"{kind} {name}: {where}.{p}" for p in job_rule_problems(job)]
    return found


def job_rule_problems(spec: dict[str, Any]) -> list[str]:
    """The RayJob rules KubeRay's admission checks enforce and its CRD schema accepts."""
    out = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    mode = spec.get("submissionMode", "K8sJobMode")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        out.append("ttlSecondsAfterFinished: > 0 needs shutdownAfterJobFinishes: true")
    if spec.get("deletionStrategy", {}).get("deletionRules") and shutdown:
        out.append("deletionStrategy.deletionRules: can't be used together with shutdownAfterJobFinishes")
    if spec.get("backoffLimit", 0) > 0 and "clusterSelector" in spec:
        out.append("backoffLimit: > 0 can't be used with clusterSelector (a retry creates a new cluster)")
    if spec.get("backoffLimit", 0) > 0 and mode == "InteractiveMode":
        out.append("backoffLimit: > 0 can't be used with submissionMode InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        out.append("submissionMode: SidecarMode can't be used with submitterPodTemplate or submitterConfig")
    if spec.get("suspend") and not shutdown:
        out.append("suspend: true needs shutdownAfterJobFinishes: true")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec) and mode != "InteractiveMode":
        out.append("rayClusterSpec / clusterSelector: exactly one of them")
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

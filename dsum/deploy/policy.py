"""What every manifest dsum ships or renders must hold, whatever the Kubernetes and KubeRay schemas allow.

- every pod: non-root, no privilege escalation, all capabilities dropped, a read-only root filesystem,
  CPU and memory requests and limits on every container (the Ray autoscaler sidecar included), no host
  namespaces or host paths;
- nothing in front of the Ray dashboard or MLflow but a ClusterIP Service: no NodePort, LoadBalancer or
  Ingress;
- secrets only by reference: no Secret with data, no literal value in a variable named like a secret,
  no credentials inside a URI, no token-shaped string anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from dsum.deploy import kuberay

SECRET_NAME = re.compile(r"(^|_)(TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIALS?)(_|$)", re.I)
SECRET_VALUE = [
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@"), "a URI with credentials"),  # $(VAR) refs allowed
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), "an API key"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "an AWS access key"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
]
EXPOSED = ("NodePort", "LoadBalancer")


def violations(objs: list[dict[str, Any]]) -> list[str]:
    """Every rule above that `objs` break, one line each naming the object and the field."""
    out: list[str] = []
    for obj in objs:
        where = (
            f"{obj.get('kind')} {obj.get('metadata', {}).get('name') or obj.get('metadata', {}).get('generateName')}"
        )
        for path, pod in pod_specs(obj):
            out += [f"{where}: {path}: {p}" for p in _pod_problems(pod)]
        out += [f"{where}: {p}" for p in _exposure(obj)]
        out += [f"{where}: {p}" for p in _secrets(obj)]
    return out


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodSpec) of every pod an object makes."""
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind == "Pod":
        yield "spec", spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield "spec.template.spec", spec.get("template", {}).get("spec", {})
    elif kind == "CronJob":
        yield (
            "spec.jobTemplate.spec.template.spec",
            spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {}),
        )
    elif kind in kuberay.SCHEMAS:
        for path, template in kuberay.pod_templates(obj):
            yield f"{path}.spec", template.get("spec", {})
        for path, cluster in kuberay.clusters(obj):
            if cluster.get("enableInTreeAutoscaling"):
                sidecar = {"name": "autoscaler"} | cluster.get("autoscalerOptions", {})
                head = cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
                yield (
                    f"{path}.autoscalerOptions",
                    {"containers": [sidecar], "securityContext": head.get("securityContext", {})},
                )


def _pod_problems(pod: dict[str, Any]) -> list[str]:
    out = []
    pod_sc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{flag}: true")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            out.append(f"volumes[{volume.get('name')}]: a hostPath volume")
    if pod_sc.get("runAsUser") == 0:
        out.append("securityContext.runAsUser: 0 (root)")
    containers = [("containers", c) for c in pod.get("containers", [])]
    containers += [("initContainers", c) for c in pod.get("initContainers", [])]
    for field, c in containers:
        at = f"{field}[{c.get('name')}]"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{at}: privileged")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{at}: runs as root (runAsUser 0)")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot", False)):
            out.append(f"{at}: runAsNonRoot is not set")
        if sc.get("allowPrivilegeEscalation", True):
            out.append(f"{at}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            out.append(f"{at}: capabilities: must drop ALL and add none")
        if not sc.get("readOnlyRootFilesystem"):
            out.append(f"{at}: readOnlyRootFilesystem is not true")
        resources = c.get("resources", {})
        for bound in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in resources.get(bound, {})]
            if missing:
                out.append(f"{at}: no {' / '.join(missing)} {bound}")
    return out


def _exposure(obj: dict[str, Any]) -> list[str]:
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind == "Service" and spec.get("type") in EXPOSED:
        return [f"spec.type: {spec['type']} (the dashboard and MLflow stay inside the cluster: ClusterIP only)"]
    if kind == "Ingress":
        return ["an Ingress (the dashboard and MLflow stay inside the cluster)"]
    out = []
    for path, cluster in kuberay.clusters(obj):
        head = cluster.get("headGroupSpec", {})
        if head.get("serviceType") in EXPOSED:
            out.append(f"{path}.headGroupSpec.serviceType: {head['serviceType']} exposes the Ray dashboard")
        if head.get("enableIngress"):
            out.append(f"{path}.headGroupSpec.enableIngress: exposes the Ray dashboard")
    return out


def _secrets(obj: dict[str, Any]) -> list[str]:
    out = []
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        out.append("a Secret with its values inside the manifest (create it with kubectl; reference it by name)")
    for path, node in _walk(obj, ""):
        if isinstance(node, dict) and "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            if str(node["value"]).strip():
                out.append(f"{path}: {node['name']} holds a literal value (use valueFrom.secretKeyRef)")
        if isinstance(node, str):
            out += [f"{path}: {what} inside the manifest" for pattern, what in SECRET_VALUE if pattern.search(node)]
    return out


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")

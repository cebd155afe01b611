"""Kubernetes' own rules for the values `dsum k8s render` writes into manifests, so that a value the API
server, the kubelet or the operator would refuse is one line at render time, not a rejected object (or a pod
stuck in InvalidImageName) after `kubectl apply`. Each rule cites the code it reproduces.

Every check returns None when the value is fine, else the reason in a few words.
"""

from __future__ import annotations

import re
import zoneinfo

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
"""k8s.io/apimachinery/pkg/util/validation/validation.go, IsDNS1123Label (namespaces, most names): at most
63 characters."""
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
"""The same file, IsDNS1035Label: a DNS-1123 label that starts with a letter. KubeRay v1.7 requires it of
RayCluster, RayJob and RayCronJob names (ray-operator/controllers/ray/utils/validation.go), since it derives
Service names from them."""
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
"""The same file, IsValidLabelValue: at most 63 characters, empty allowed."""

QUANTITY = re.compile(
    r"(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?"
)
"""k8s.io/apimachinery/pkg/api/resource/quantity.go: the grammar of a resource.Quantity (<signedNumber>
<suffix>), as the pattern its OpenAPI schema carries in every CRD (KubeRay's included)."""
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}

# github.com/distribution/reference regexp.go (v0.6), the grammar the kubelet parses an image with
# (ParseNormalizedNamed); a name is at most 255 characters (reference.go, NameTotalLengthMax).
_ALNUM, _SEP = r"[a-z0-9]+", r"(?:[._]|__|[-]+)"
_PATH = _ALNUM + f"(?:{_SEP}{_ALNUM})*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[(?:[a-fA-F0-9:]+)\])"
IMAGE = re.compile(
    rf"(?P<name>(?:{_HOST}(?::[0-9]+)?/)?{_PATH}(?:/{_PATH})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?"
)

# github.com/robfig/cron/v3 parser.go, ParseStandard (what Kubernetes' CronJob validation and KubeRay's
# RayCronJob controller parse a schedule with): five fields, each a comma list of ranges
# `*|?|N|N-M` with an optional `/step`, names for months and weekdays.
CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}),
    ("day of week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)


def dns_label(value: str, dns1035: bool = False) -> str | None:
    rule, what = (DNS1035_LABEL, "a letter") if dns1035 else (DNS1123_LABEL, "a lowercase letter or digit")
    if len(value) > 63:
        return f"longer than 63 characters ({len(value)})"
    if not rule.fullmatch(value):
        return f"must be lowercase letters, digits and '-', starting with {what} and ending with a letter or digit"
    return None


def label_value(value: str) -> str | None:
    if len(value) > 63:
        return f"longer than 63 characters ({len(value)})"
    if not LABEL_VALUE.fullmatch(value):
        return "must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    return None


def quantity_bytes(value: str) -> float | None:
    """The amount a quantity stands for (bytes, for memory), or None when it is no quantity."""
    if not QUANTITY.fullmatch(value):
        return None
    number = re.match(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", value).group(0)
    suffix = value[len(number) :]
    if suffix[:1] in ("e", "E"):
        return float(number) * 10 ** float(suffix[1:])
    return float(number) * (_BINARY.get(suffix) or _DECIMAL[suffix])


def image(value: str) -> str | None:
    if not value or value != value.strip():
        return "must not be empty or have spaces around it"
    found = IMAGE.fullmatch(value)
    if not found:
        return "is not an image reference: [registry[:port]/]name[:tag][@digest], the name in lowercase"
    if len(found.group("name")) > 255:
        return "its name is longer than 255 characters"
    return None


def cron(schedule: str) -> str | None:
    if "TZ" in schedule:  # validation.go, validateScheduleFormat: the timeZone field says it
        return "TZ= or CRON_TZ= in the schedule is not allowed: use --time-zone"
    fields = schedule.split()
    if len(fields) != 5:
        return f"not a cron schedule: five fields (minute hour day month weekday), found {len(fields)}"
    for text, (name, low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for expr in text.split(","):
            problem = _cron_range(expr, low, high, names)
            if problem:
                return f"{name} field {text!r}: {problem}"
    return None


def _cron_range(expr: str, low: int, high: int, names: dict[str, int]) -> str | None:
    span, _, step = expr.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        return f"step {step!r} is not a positive number"
    if "/" in step:
        return "too many slashes"
    if span in ("*", "?"):
        return None
    ends = span.split("-")
    if len(ends) > 2:
        return "too many hyphens"
    values = []
    for end in ends:
        value = names.get(end.lower()) if end.lower() in names else (int(end) if end.isdigit() else None)
        if value is None:
            return f"{end!r} is not a number" + (f" or a name ({', '.join(names)})" if names else "")
        values.append(value)
    if values[0] < low or values[-1] > high:
        return f"{span} is outside {low}-{high}"
    if values[0] > values[-1]:
        return f"{span} starts after it ends"
    return None


_ZONE_PART = re.compile(r"[A-Za-z.\-_0-9+]{1,14}")


def time_zone(name: str) -> str | None:
    """k8s.io/kubernetes/pkg/apis/batch/validation/validation.go, validateTimeZone: each '/' part of the name
    as IANA's naming rules have it (validTimeZoneCharacters, no '.', '..' or leading '-'), not 'Local' (it
    would depend on the controller's machine), and loadable from the IANA database (time.LoadLocation)."""
    if name.lower() == "local":
        return "'Local' is not allowed: name an IANA zone (e.g. Etc/UTC, Europe/Berlin)"
    parts_ok = all(p not in (".", "..") and not p.startswith("-") and _ZONE_PART.fullmatch(p) for p in name.split("/"))
    try:
        if parts_ok:
            zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        parts_ok = False
    return None if parts_ok else "not an IANA time zone (e.g. Etc/UTC, Europe/Berlin, America/New_York)"

"""The model registry: a summarizer flavor, registration, and promotion behind a quality gate.

A registered version is an MLflow pyfunc model holding the run's adapter (or full weights), tokenizer and
resolved config; `mlflow.pyfunc.load_model("models:/NAME@champion").predict(dialogues)` returns
summaries. Aliases: `champion` (what serves), `previous-champion` (what `rollback` restores). Every
decision is written as tags on the version it concerns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc

from dsum import rundir
from dsum.config import TrackingConfig
from dsum.errors import DsumError, one_line

CHAMPION, PREVIOUS = "champion", "previous-champion"
SCORES_FILE = "promotion_scores.json"  # per-example scores of the promotion metric, in the run's artifacts


class Summarizer(mlflow.pyfunc.PythonModel):
    """Base model + adapter from a dsum run; predict(dialogues) → summaries (labels for classifiers)."""

    def load_context(self, context):
        from dsum import config
        from dsum import model as models

        run = rundir.RunDir(Path(context.artifacts["run"]))
        self.job = config.load(run.config)
        weights = str(run.final)
        self.tokenizer = models.load_tokenizer(self.job.model, weights)
        self.model = models.load_trained(self.job.model, self.job.method, weights)

    def predict(self, context, model_input: list[str], params=None):
        """Summaries (str), or a classifier's labels (int). The input's type hint is MLflow's schema: it checks
        the input and hands a one-column DataFrame over as its column's list. The output has none: MLflow 3.17
        warns at logging on a union or Any (mlflow/types/type_hints.py), and the two tasks return different types."""
        from dsum.eval import generate

        texts = [str(x) for x in model_input]
        job = self.job
        if job.model.task == "classification":
            return generate.classify(self.model, self.tokenizer, texts, job.data, job.eval)
        return generate.generate(self.model, self.tokenizer, texts, job.data, job.eval, job.model.task)


def log_summarizer(uri: str, run_id: str, run_dir: Path) -> str:
    """Log the run's model as a pyfunc Summarizer in the MLflow run; returns its model URI."""
    import dsum

    with tempfile.TemporaryDirectory(prefix="dsum-model-") as tmp:
        staged = Path(tmp) / "run"
        staged.mkdir()
        shutil.copy(run_dir / rundir.CONFIG, staged / rundir.CONFIG)
        shutil.copytree(rundir.RunDir(run_dir).final, staged / rundir.FINAL)
        with using_uri(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name="summarizer",
                python_model=str(Path(__file__).with_name("summarizer_model.py")),
                artifacts={"run": str(staged)},
                code_paths=[str(Path(dsum.__file__).parent)],  # the model carries the code that loads it
                pip_requirements=[
                    f"{p}=={importlib.metadata.version(p)}"
                    for p in ("torch", "transformers", "peft", "accelerate", "pyyaml", "pydantic", "mlflow")
                ],
            )
    return info.model_uri


MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


@dataclasses.dataclass(frozen=True)
class RegisteredRun:
    name: str
    version: str
    run: rundir.RunDir  # the version's run: config.yaml and final/


def parse_model_uri(model_uri: str) -> re.Match:
    """models:/NAME@ALIAS or models:/NAME/VERSION, parsed (groups name, alias, version), or one line."""
    found = MODEL_URI.fullmatch(model_uri)
    if found is None:
        raise DsumError(f"--model {model_uri}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    return found


def registered_run(client, found: re.Match, tracking_uri: str, cache: Path) -> RegisteredRun:
    """The dsum run a registered version holds (its resolved config and final/ weights; the base model comes
    from the hub, or a tiny preset is rebuilt, when it loads), for `found` (parse_model_uri) at `tracking_uri`
    (`client`: a client of it). A version's files never change: each is downloaded once, into `cache`. A name,
    alias or version the registry doesn't hold is one line that says which."""
    model_uri = found.string
    name, alias, number = found["name"], found["alias"], found["version"]
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise DsumError(f"{model_uri}: the registry at {tracking_uri} failed: {one_line(e)}") from None
        raise DsumError(f"{model_uri}: no registered model named {name!r} at {tracking_uri}") from None
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as e:
        # not there: an alias is INVALID_PARAMETER_VALUE, a version RESOURCE_DOES_NOT_EXIST (mlflow 3.17 stores)
        if e.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise DsumError(f"{model_uri}: the registry at {tracking_uri} failed: {one_line(e)}") from None
        if alias:
            held = ", ".join(sorted(model.aliases)) or "none"
            raise DsumError(f"{model_uri}: {name} has no alias {alias!r} (its aliases: {held})") from None
        held = ", ".join(
            str(n) for n in sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        )
        raise DsumError(f"{model_uri}: {name} has no version {number} (its versions: {held or 'none'})") from None
    dest = cache / "registry" / name / f"v{version.version}"
    if not (dest / "artifacts" / "run" / rundir.CONFIG).exists():
        # models:/ URIs resolve through the process's registry URI, whatever tracking_uri says (mlflow 3.17
        # store/artifact/models_artifact_repo.py): set for the download, then put back
        with rundir.staged(dest) as partial, using_uri(tracking_uri):
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(partial))
    return RegisteredRun(name, version.version, rundir.find(dest / "artifacts" / "run"))


@contextlib.contextmanager
def using_uri(uri: str):
    """MLflow's fluent API (log_model has no client form) at `uri` while the body runs, and what resolves
    through it: a models:/ URI, also when a client registers a version of a logged model (a local store looks
    the logged model up in the process's store, mlflow 3.17). The process's own tracking URI is put back after,
    so this changes nothing a caller of dsum relies on. set_tracking_uri
    also sets MLFLOW_TRACKING_URI, and None unsets both (mlflow 3.17 tracking/_tracking_service/utils.py):
    the variable as it was is the state to put back."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def judge(metric: str, gain: float, low: float, high: float, margin: float, min_ci_low: float, over: str):
    """The one promotion rule, for a first champion (over its base model) and for `dsum promote` (over the
    champion): the mean gain is at least `margin` and the paired-bootstrap 95% CI of it lies above
    `min_ci_low` (tracking.promote_margin / promote_min_ci_low, or promote's --margin / --min-ci-low).
    Returns (passed, the reason in words)."""
    stats = f"{metric} {gain:+.4f} (95% CI {low:+.4f} to {high:+.4f}) over {over}"
    if gain >= margin and low > min_ci_low:
        return True, f"{stats}: gain ≥ {margin} and CI low > {min_ci_low}"
    if gain < margin:
        return False, f"{stats}: gain below the margin {margin}"
    return False, f"{stats}: CI low not above {min_ci_low}"


BASE_GAIN = ("dsum.base_gain", "dsum.base_ci_low", "dsum.base_ci_high")  # tags: the version's gain over its base


def register(
    client,
    name: str,
    model_uri: str,
    run_id: str,
    result,
    gate: TrackingConfig,
) -> dict[str, Any]:
    """A new version of `name` with its eval tags. With no champion yet, the version becomes champion when it
    beats its base model by the promotion rule (`judge`, with the job's margins: gate.promote_margin,
    gate.promote_min_ci_low), unless gate.first_champion is false: then every version waits for `dsum promote`.

    The champion is looked up before anything is written: a registry that can't answer stops registration
    with nothing registered, rather than passing for one that has no champion.
    """
    metric = result.primary_metric
    champion = _alias(client, name, CHAMPION)
    scores = result.per_example(metric)
    client.log_text(run_id, json.dumps({"metric": metric, "fingerprint": result.fingerprint, "scores": scores}),
                    SCORES_FILE)  # fmt: skip
    m = result.metrics[metric]
    tags = {
        "dsum.metric": metric,
        "dsum.score": f"{m['tuned']:.6f}",
        "dsum.eval_fingerprint": result.fingerprint,
        "dsum.eval_split": result.split,
        "dsum.eval_examples": str(result.examples),
    }
    if "ci_low" in m:
        passed, verdict = judge(
            metric,
            m["delta"],
            m["ci_low"],
            m["ci_high"],
            gate.promote_margin,
            gate.promote_min_ci_low,
            "the base model",
        )
        tags |= dict(zip(BASE_GAIN, (f"{m[k]:.6f}" for k in ("delta", "ci_low", "ci_high")), strict=True))
    else:
        passed, verdict = False, "no comparison with the base model (eval.compare_base=false)"
    tags["dsum.eval_passed"] = str(passed).lower()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model_id = model_uri.removeprefix("models:/")  # log_summarizer's models:/<logged model id>
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
    outcome = {"registered_model": name, "model_version": version.version, "champion": False}
    if champion is None and not gate.first_champion:
        outcome["reason"] = (
            f"no champion yet; tracking.first_champion=false: `dsum promote --model {name} --candidate {version.version}` decides"
        )
    elif champion is None:
        with _changing(client, name):
            champion = _alias(client, name, CHAMPION)  # another run's version may have become champion meanwhile
            if champion is None:
                if passed:
                    client.set_registered_model_alias(name, CHAMPION, version.version)
                    outcome["champion"] = True
                reason = ("first version; " if passed else "not champion: ") + verdict
                _record(client, name, version.version, "promoted" if passed else "refused", reason)
                outcome["reason"] = reason
    if "reason" not in outcome:  # a champion: there before, or another run's version that came first
        outcome["reason"] = (
            f"v{champion.version} is champion; `dsum promote --model {name} --candidate {version.version}` compares them"
        )
    return outcome


def promote(client, name: str, candidate: str, margin: float, min_ci_low: float, samples: int = 1000) -> dict:
    """Make `candidate` champion if it beats the champion on the same eval set; else refuse, saying why."""
    return commit(client, compare(client, name, candidate, margin, min_ci_low, samples))


def compare(client, name: str, candidate: str, margin: float, min_ci_low: float, samples: int = 1000) -> dict:
    """The promotion rule applied to `candidate` and the champion as the registry holds them now (over its base
    model when there is no champion): the decision `commit` writes. Changes nothing."""
    from dsum.eval import metrics

    cand = _version(client, name, candidate)
    champ = _alias(client, name, CHAMPION)
    decision: dict[str, Any] = {"registered_model": name, "candidate": cand.version, "champion": None}
    if champ is None:  # the same rule, over the base model the version was evaluated against
        if not all(k in cand.tags for k in BASE_GAIN):
            reason = "no champion yet, and no comparison with the base model was recorded (eval.compare_base=false)"
            return decision | {"promoted": False, "reason": reason}
        gain, low, high = (float(cand.tags[k]) for k in BASE_GAIN)
        decision |= {"metric": cand.tags.get("dsum.metric"), "gain": gain, "ci_low": low, "ci_high": high}
        ok, verdict = judge(decision["metric"], gain, low, high, margin, min_ci_low, "the base model")
        return decision | {"promoted": ok, "reason": "no champion yet; " + verdict}
    decision["champion"] = champ.version
    if champ.version == cand.version:
        return decision | {"promoted": False, "reason": f"version {cand.version} is already champion"}
    fp_c, fp_h = cand.tags.get("dsum.eval_fingerprint"), champ.tags.get("dsum.eval_fingerprint")
    if fp_c != fp_h:
        reason = f"evaluated on a different eval set (fingerprint {fp_c} vs champion's {fp_h}); not comparable"
        return decision | {"promoted": False, "reason": reason}
    metric, c_scores = _scores(client, cand)
    _, h_scores = _scores(client, champ)
    if len(c_scores) != len(h_scores):
        return decision | {"promoted": False, "reason": "per-example scores don't pair up"}
    gain = sum(c_scores) / len(c_scores) - sum(h_scores) / len(h_scores)
    low, high = metrics.paired_bootstrap(h_scores, c_scores, samples)
    decision |= {"metric": metric, "gain": gain, "ci_low": low, "ci_high": high}
    ok, reason = judge(metric, gain, low, high, margin, min_ci_low, f"v{champ.version}")
    return decision | {"promoted": ok, "reason": reason}


def commit(client, decision: dict) -> dict:
    """Write a `compare` decision: the aliases when it promotes, and the decision's tags on the candidate, under
    the model's registry lock (`_changing`). When the champion is no longer the one the decision compared with
    (another promotion, rollback or first registration came first), nothing is written: one line says so."""
    name, cand = decision["registered_model"], decision["candidate"]
    with _changing(client, name):
        now = _alias(client, name, CHAMPION)
        if (now.version if now else None) != decision["champion"]:
            was = f"v{decision['champion']}" if decision["champion"] else "no champion"
            raise DsumError(
                f"{name}: the registry changed while v{cand} was compared: the champion was {was}, it is "
                f"{f'v{now.version}' if now else 'none'} now; nothing changed: run `dsum promote` again to compare "
                "with it"
            )
        if decision["promoted"]:
            if now is not None:
                client.set_registered_model_alias(name, PREVIOUS, now.version)
            client.set_registered_model_alias(name, CHAMPION, cand)
        extra = {k: f"{decision[k]:.6f}" for k in ("gain", "ci_low", "ci_high") if k in decision}
        _record(client, name, cand, "promoted" if decision["promoted"] else "refused", decision["reason"], extra)
    return decision


def rollback(client, name: str) -> dict[str, Any]:
    """Champion ← previous champion; the demoted version is tagged with why."""
    with _changing(client, name):
        previous = _alias(client, name, PREVIOUS)
        if previous is None:
            raise DsumError(f"{name}: no {PREVIOUS} to roll back to")
        current = _alias(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        client.delete_registered_model_alias(name, PREVIOUS)
        if current is not None:
            _record(client, name, current.version, "rolled-back", f"champion rolled back to v{previous.version}")
        _record(client, name, previous.version, "restored", "champion again after a rollback")
    return {"registered_model": name, "champion": previous.version, "demoted": current.version if current else None}


LOCK = "{name}.dsum-lock"  # the registered model whose existence is a model's registry lock


@contextlib.contextmanager
def _changing(client, name: str, wait_s: float = 60.0, stale_s: float = 300.0):
    """Hold `name`'s registry lock while the body reads and changes its aliases, so that two commands (two
    promotions, a promotion and a rollback, two first registrations) never interleave their writes: MLflow's
    aliases have no compare-and-set, and two promotions that both set previous-champion to the champion they
    replaced would leave it naming a version that was not champion just before the current one.

    The lock is a registered model, LOCK: creating one is atomic in every MLflow store (the name is the key of
    its table; the second create is RESOURCE_ALREADY_EXISTS). A command waits up to `wait_s` for it; one
    older than `stale_s` (its holder died: the body takes seconds) is taken over."""
    lock = LOCK.format(name=name)
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"dsum.lock_holder": holder},
                description=f"held by dsum while it changes {name}'s aliases; delete it if the command that holds "
                "it died",
            )
            break
        except mlflow.exceptions.MlflowException as e:
            # taken (ALREADY_EXISTS); or taken and released at once: MLflow's SQL store answers a duplicate
            # name by reading the model it collided with, which its holder may have deleted in between
            # (mlflow 3.17, store/model_registry/sqlalchemy_store.py, create_registered_model's IntegrityError)
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise DsumError(
                    f"{name}: the registry could not lock the model; nothing changed: {one_line(e)}"
                ) from None
        try:
            held = client.get_registered_model(lock)
            since = time.time() - held.creation_timestamp / 1000
        except mlflow.exceptions.MlflowException:
            held, since = None, 0.0  # released meanwhile: try again
        if held is not None and since > stale_s:
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.delete_registered_model(lock)
        elif time.monotonic() > deadline:
            by = held.tags.get("dsum.lock_holder", "?") if held is not None else "?"
            raise DsumError(
                f"{name}: another command is changing its aliases ({by}, for {since:.0f} s: registered model "
                f"{lock}); nothing changed: try again"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model(lock)


def _record(client, name: str, version: str, decision: str, reason: str, extra: dict | None = None) -> None:
    tags = {"decision": decision, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in (tags | (extra or {})).items():
        client.set_model_version_tag(name, version, f"dsum.promotion.{key}", value)


def _version(client, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as e:
        if _not_found(e):
            raise DsumError(f"{name}: no version {version} in the registry") from None
        raise DsumError(f"{name}: the registry could not look up version {version}: {one_line(e)}") from None


def _alias(client, name: str, alias: str):
    """The version `alias` points to; None only when the registry says it doesn't exist. Any other
    failure (a server error, a timeout) is an error: read as "no champion", it would skip the gate."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as e:
        if _not_found(e):
            return None
        raise DsumError(
            f"{name}: the registry could not look up alias {alias!r}; no alias was changed: {one_line(e)}"
        ) from None


def _not_found(e: mlflow.exceptions.MlflowException) -> bool:
    # MLflow reports a missing model or version as RESOURCE_DOES_NOT_EXIST and a missing alias as
    # INVALID_PARAMETER_VALUE with "alias ... not found"
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in e.message
    )


def _scores(client, version) -> tuple[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(version.run_id, SCORES_FILE, tmp)
        saved = json.loads(Path(path).read_text())
    return saved["metric"], saved["scores"]

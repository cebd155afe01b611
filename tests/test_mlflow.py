"""MLflow tracking and the registry against a real `mlflow server` (on PostgreSQL: conftest.start_tracking) on 127.0.0.1.

train → register → champion → load `models:/NAME@champion` → summarize; promotion refuses a worse
candidate, promotes a better one, and rollback restores the old champion (one scored on another eval set
is refused in test_ray_cluster.py, by a run that has a reason of its own to score 4 examples). Faults: an unreachable server stops the job before training; a server killed mid-run leaves
training to finish, registers nothing and exits non-zero; a failed run is FAILED in MLflow and registers
nothing; a proxy that fails alias lookups (HTTP 500, or no answer) makes `dsum train` and `dsum promote`
fail with one line and change no alias.
"""

import dataclasses
import io
import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from conftest import JOBS, REGISTERED, ROOT, dsum_here, free_port
from mlflow_proxy import FaultyProxy

from dsum import rundir
from dsum.cli import _results_table
from dsum.config import TrackingConfig
from dsum.eval.run import EvalResult
from dsum.tracking import registry

pytestmark = pytest.mark.e2e

MODEL = REGISTERED
# every run is scored on the whole test split, as the champion (conftest.default_run) was
FAST = ["train.warmup_ratio=0", "train.logging_steps=5", "tracking.timeout_s=5"]
SMALL_EVAL = ["eval.compare_base=false", "eval.max_samples=4"]  # for runs whose scores no test compares
ALIAS_LOOKUP = "/registered-models/alias"
DIALOGUE = "#Person1#: Shall we meet at the cafe at noon?\n#Person2#: Yes, see you there at noon."


def _train_args(url: str, name: str, model: str = MODEL) -> list:
    """`dsum train` arguments of a run named `name`, tracked at `url` and registered as `model`."""
    job = JOBS / "tiny-dialogsum.yaml"
    return [job, *FAST, f"train.run_name={name}", f"tracking.tracking_uri={url}", f"tracking.registered_model={model}"]


def _promote(server_url, version):
    proc = dsum_here(
        "promote", "--model", MODEL, "--candidate", version, "--tracking-uri", server_url, "--json", cwd=ROOT
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return proc.returncode, json.loads(proc.stdout)


def _champion(client, alias="champion", name=MODEL):
    return client.get_model_version_by_alias(name, alias).version


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture(scope="module")
def champion_run(default_run):
    """Version 1: the session's default run (conftest.default_run), which beats its base."""
    return default_run


def test_first_passing_version_is_champion_and_serves(server, champion_run, monkeypatch):
    _, result = champion_run
    tracked = result["tracking"]
    assert tracked["model_version"] == "1" and tracked["champion"] is True, tracked
    # logging the model (MLflow's fluent API) left this process's tracking URI as it was: the session's store
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] != server.url
    # the end of `dsum train`: where the run is (and how to open it), what was registered and decided
    lines = _results_table(result).splitlines()
    page = f"#/experiments/{tracked['experiment_id']}/runs/{tracked['run_id']}"
    assert lines[-2] == f"mlflow run: {tracked['run_id']} at {server.url}; open {server.url}/{page}"
    assert lines[-1].startswith(f"registered: {MODEL} v1, champion: first version; rougeL +")
    assert lines[-1].endswith("over the base model: gain ≥ 0.005 and CI low > 0.0")
    local = _results_table(result | {"tracking": tracked | {"tracking_uri": "sqlite:///mlflow.db"}})
    assert f"mlflow ui --backend-store-uri sqlite:///mlflow.db, then http://127.0.0.1:5000/{page}" in local
    client = server.client()
    assert _champion(client) == "1"
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dsum.state"] == "finished"
    # parameters = the flattened resolved config; metrics over steps and from the evaluation; provenance tags
    assert run.data.params["train.max_steps"] == "60" and run.data.params["method.r"] == "16"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 10
    assert run.data.metrics["tuned_rougeL"] == pytest.approx(result["tuned"]["rougeL"])
    assert run.data.metrics["delta_rougeL_ci_low"] > 0
    tags = run.data.tags
    assert (
        tags["dsum.base_model"] == "tiny-llama"
        and tags["dsum.data.train.fingerprint"] == result["splits"]["train"]["fingerprint"]
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["dsum.version"] and tags["dsum.git_commit"] == head and len(head) == 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "adapter", "eval", "train_metrics.json", "promotion_scores.json"} <= artifacts
    report = {a.path for a in client.list_artifacts(run.info.run_id, "eval/test")}
    assert {"eval/test/report.md", "eval/test/scores_boxplot.png", "eval/test/predictions.jsonl"} <= report
    # The registered model loads as pyfunc and summarizes, the same as the run directory does.
    previous = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(server.url)  # also sets MLFLOW_TRACKING_URI, which later tests' CLIs inherit
    try:
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict([DIALOGUE])
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ["MLFLOW_TRACKING_URI"] = previous
    monkeypatch.setattr("sys.stdin", io.StringIO(DIALOGUE))
    local = dsum_here("summarize", "--model", champion_run[0] / "runs/v1", "--json", cwd=ROOT)
    assert local.returncode == 0, local.stderr[-2000:]
    assert served == json.loads(local.stdout)["summaries"] and served[0].strip()


def test_the_champion_by_name_summarizes_and_evaluates(server, champion_run, tmp_path):
    """`dsum summarize` and `dsum eval` take a registered version by name (models:/NAME@ALIAS or /VERSION),
    downloaded from the server once: the same summaries as the run directory; a name, alias or version the
    registry lacks is one line naming it, exit 2, and nothing downloaded."""
    cache = Path(os.environ["DSUM_CACHE"]) / "registry" / MODEL  # the session's cache (conftest._session_env)
    cwd, result = champion_run
    dialogues = tmp_path / "dialogues.txt"
    dialogues.write_text(DIALOGUE)
    local = dsum_here("summarize", "--model", cwd / "runs/v1", dialogues, "--json", cwd=tmp_path)
    by_name = {}
    for model in (f"models:/{MODEL}@champion", f"models:/{MODEL}/1"):
        proc = dsum_here("summarize", "--model", model, "--tracking-uri", server.url, dialogues, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        by_name[model] = json.loads(proc.stdout)["summaries"]
    assert list(by_name.values()) == [json.loads(local.stdout)["summaries"]] * 2
    assert [p.name for p in cache.iterdir()] == ["v1"]  # downloaded once

    data = tmp_path / "few.jsonl"
    data.write_text(json.dumps({"dialogue": DIALOGUE, "summary": "They meet at the cafe at noon."}) + "\n")
    proc = dsum_here("eval", "--model", f"models:/{MODEL}@champion", "--tracking-uri", server.url, "--data", data,
                     "eval.compare_base=false", "--json", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads(proc.stdout)
    assert scored["examples"] == 1 and scored["report"] == str(tmp_path / f"runs/{MODEL}-v1/eval/file-few/report.md")

    for model, says in [
        (f"models:/{MODEL}@nope", f"{MODEL} has no alias 'nope' (its aliases: champion"),
        (f"models:/{MODEL}/99", f"{MODEL} has no version 99 (its versions: 1"),
        ("models:/no-such-model@champion", f"no registered model named 'no-such-model' at {server.url}"),
        (f"models:/{MODEL}", "a registered model is models:/NAME@ALIAS or models:/NAME/VERSION"),
    ]:
        proc = dsum_here("summarize", "--model", model, "--tracking-uri", server.url, dialogues, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
    assert [p.name for p in cache.iterdir()] == ["v1"]


def test_with_first_champion_false_even_a_passing_first_version_waits(server, champion_run, monkeypatch):
    """tracking.first_champion=false (the scheduled sweeps' training of their best configuration): a model
    with no champion yet is registered and waits for `dsum promote`, which then decides as usual."""
    cwd, result = champion_run
    monkeypatch.chdir(cwd)  # the evaluation's file paths are relative to the run's working directory
    saved = json.loads((Path(result["report"]).parent / rundir.EVAL_SUMMARY).read_text())
    evaluated = EvalResult(**{f.name: saved[f.name] for f in dataclasses.fields(EvalResult)})
    tracked, client, name = result["tracking"], server.client(), "dsum-waits"
    outcome = registry.register(
        client, name, tracked["model_uri"], tracked["run_id"], evaluated, TrackingConfig(first_champion=False)
    )
    assert outcome["champion"] is False and "first_champion=false" in outcome["reason"], outcome
    with pytest.raises(mlflow.exceptions.MlflowException, match="alias"):
        client.get_model_version_by_alias(name, "champion")
    proc = dsum_here(
        "promote", "--model", name, "--candidate", outcome["model_version"], "--tracking-uri", server.url, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert client.get_model_version_by_alias(name, "champion").version == outcome["model_version"]


def test_one_rule_makes_a_first_champion_and_a_promotion(server, champion_run, monkeypatch):
    """A first champion is judged by the rule `dsum promote` applies (registry.judge), over its base model and
    with the job's margins; `dsum promote` with no champion judges the same recorded gain the same way."""
    cwd, result = champion_run
    monkeypatch.chdir(cwd)
    saved = json.loads((Path(result["report"]).parent / rundir.EVAL_SUMMARY).read_text())
    evaluated = EvalResult(**{f.name: saved[f.name] for f in dataclasses.fields(EvalResult)})
    tracked, client, name = result["tracking"], server.client(), "dsum-margin"
    gain = evaluated.metrics["rougeL"]["delta"]
    assert 0.005 < gain < 1  # it passed with the default margin (version 1 of the session's model)
    outcome = registry.register(
        client, name, tracked["model_uri"], tracked["run_id"], evaluated, TrackingConfig(promote_margin=1.0)
    )
    assert outcome["champion"] is False and outcome["reason"].startswith("not champion: rougeL +"), outcome
    assert outcome["reason"].endswith("over the base model: gain below the margin 1.0")
    version = outcome["model_version"]
    assert client.get_model_version(name, version).tags["dsum.eval_passed"] == "false"

    def promote(margin: str):
        args = ["promote", "--model", name, "--candidate", version, "--margin", margin, "--tracking-uri", server.url]
        proc = dsum_here(*args, "--json", cwd=ROOT)
        return proc.returncode, json.loads(proc.stdout)

    code, decision = promote("1.0")
    assert code == 1 and decision["promoted"] is False and decision["gain"] == pytest.approx(gain, abs=1e-6)
    assert decision["reason"] == "no champion yet; " + outcome["reason"].removeprefix("not champion: ")
    code, decision = promote("0.005")
    assert code == 0 and decision["promoted"] and _champion(client, name=name) == version, decision


def test_better_candidate_is_promoted_the_worse_refused_and_rollback_restores(server, champion_run, train_here):
    cwd, _ = champion_run
    # On this test split a 40-step run beats the 60-step champion: ROUGE-L 0.18 vs 0.13, the paired 95% CI
    # of the gain +0.02 to +0.08 (measured; the cosine schedule that ends at step 40 suits this data better).
    result = train_here(*_train_args(server.url, "better"), "train.max_steps=40", "eval.compare_base=false", cwd=cwd)
    version = result["tracking"]["model_version"]
    assert result["tracking"]["champion"] is False  # registered, waiting for a decision
    code, decision = _promote(server.url, version)
    assert code == 0 and decision["promoted"] and decision["ci_low"] > 0, decision
    client = server.client()
    assert _champion(client) == version and _champion(client, "previous-champion") == "1"
    assert client.get_model_version(MODEL, version).tags["dsum.promotion.decision"] == "promoted"

    # the old champion is now the worse candidate: refused, and nothing moves
    code, decision = _promote(server.url, "1")
    assert code == 1 and decision["promoted"] is False and decision["gain"] < 0, decision
    assert _champion(client) == version
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["dsum.promotion.decision"] == "refused" and "below the margin" in tags["dsum.promotion.reason"]

    back = dsum_here("rollback", "--model", MODEL, "--tracking-uri", server.url, "--json", cwd=ROOT)
    assert back.returncode == 0, back.stderr[-2000:]
    assert _champion(client) == "1"
    assert client.get_model_version(MODEL, version).tags["dsum.promotion.decision"] == "rolled-back"
    again = dsum_here("rollback", "--model", MODEL, "--tracking-uri", server.url, cwd=ROOT)
    assert again.returncode == 2 and "no previous-champion" in again.stderr


def test_unreachable_tracking_server_stops_before_training(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    args = ["train", JOBS / "tiny-dialogsum.yaml", *FAST, "train.run_name=nowhere", "train.max_steps=4"]
    proc = dsum_here(*args, f"tracking.tracking_uri={url}", "tracking.retries=0", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dsum: error:") and f"tracking.tracking_uri: cannot reach MLflow at {url}" in last
    assert not (tmp_path / "runs").exists()  # nothing written: the server is asked first


def _run_of(client, name):
    experiment = client.get_experiment_by_name("dsum")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")
    return runs[0] if runs else None


def test_server_lost_mid_run_training_finishes_nothing_registered(tmp_path, server, ray_client):
    """dsum reaches the server through a proxy that goes away once it has passed on the first step metrics
    (a batch holding `loss`): from then on every request goes unanswered and every connection is refused, as
    when the server dies or the network drops. The proxy itself cuts at that request, so the server is lost
    at the same point of the run whatever the timing."""
    route = FaultyProxy(server.url, fail_path=ALIAS_LOOKUP, cut_after=lambda path, body: "log-batch" in path
                        and b'"loss"' in body)  # fmt: skip
    client = server.client()
    args = _train_args(route.url, "lost", f"{MODEL}-faults")
    proc = dsum_here("train", *args, "train.max_steps=12", "tracking.retries=1", *SMALL_EVAL, "--json", cwd=tmp_path)
    assert route.gone.is_set(), "the proxy passed on step metrics, then went away"
    err = proc.stderr
    # Training and evaluation finish and their results are kept; the run stops with one line, not 0:
    # the model the job asked to register was not registered.
    errors = [line for line in err.splitlines() if line.startswith("dsum: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "failed at the end of the run" in errors[0] and "nothing was registered" in errors[0]
    result = json.loads((tmp_path / "runs/lost/results.json").read_text())
    assert result["global_step"] == 12 and (tmp_path / "runs/lost/final/adapter_model.safetensors").exists()
    assert result["tuned"]["rougeL"] > 0 and "error" in result["tracking"]
    run = _run_of(client, "lost")
    assert run.info.status == "RUNNING" and run.data.tags["dsum.state"] == "training"  # never finished
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5]  # what got through
    assert client.search_model_versions(f"name = '{MODEL}-faults'") == []


@pytest.fixture
def faulty_registry(server):
    proxy = FaultyProxy(server.url, fail_path=ALIAS_LOOKUP, hang_s=20)
    yield proxy
    proxy.close()


def _registry_state(client):
    return client.get_registered_model(MODEL).aliases, sorted(
        v.version for v in client.search_model_versions(f"name = '{MODEL}'")
    )


def _only_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsum: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("fault", ["500", "hang"])
def test_promote_refuses_to_guess_when_the_champion_lookup_fails(server, champion_run, faulty_registry, fault):
    client = server.client()
    before = _registry_state(client)
    candidate = before[1][-1]
    faulty_registry.mode = fault
    proc = dsum_here("promote", "--model", MODEL, "--candidate", candidate, "--tracking-uri", faulty_registry.url,
                     "--retries", "0", "--timeout-s", "2", cwd=ROOT)  # fmt: skip
    assert "could not look up alias 'champion'; no alias was changed" in _only_error(proc)
    assert faulty_registry.failed >= 1
    assert _registry_state(client) == before


def test_train_registers_nothing_when_the_champion_lookup_fails(server, champion_run, faulty_registry, ray_client):
    cwd, _ = champion_run
    client = server.client()
    before = _registry_state(client)
    faulty_registry.mode = "500"
    args = _train_args(faulty_registry.url, "proxied")
    proc = dsum_here("train", *args, "train.max_steps=2", "tracking.retries=0", *SMALL_EVAL, cwd=cwd)
    line = _only_error(proc)
    assert "could not look up alias 'champion'" in line and "nothing was registered" in line
    assert _registry_state(client) == before  # no new version, no alias moved
    assert json.loads((cwd / "runs/proxied/results.json").read_text())["global_step"] == 2

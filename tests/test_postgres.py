"""MLflow on PostgreSQL, as a team runs it (k8s/base/mlflow.yaml): the session's tracking server is `mlflow
server` with two workers on a PostgreSQL server of the session's own (conftest.start_tracking), so every test
that tracks, registers, promotes or rolls back (test_mlflow.py, test_tune.py, ...) runs against it. Here: the
server's runs are in that database; a sweep of four trials reporting at once loses nothing (every trial's
nested run, every report's metrics, counts exact), one of them hung and stopped by tune.trial_timeout_s
(the sweep tests share this sweep: each is minutes of the suite's budget); promotions that race end with consistent aliases, and a
promotion whose view of the registry changed under it says so in one line and changes nothing."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import permutations

import pytest
from conftest import JOBS, REGISTERED, ROOT, dsum_here, json_line, most_at_once, run_workers, wait_for

from dsum.errors import DsumError
from dsum.tracking import registry

KEPT = ("eval_loss", "eval_rougeL", "loss", "train_loss")  # what a trial's nested run keeps of a report
SPACE = "{train.learning_rate: {choice: [1.0e-4, 3.0e-3]}, method.r: {choice: [4, 8]}}"


def _in_database(server, sql: str) -> str:
    return server.postgres.query("mlflow", sql)


@pytest.mark.ray
@pytest.mark.tune
def test_four_trials_reporting_at_once_lose_nothing_and_one_that_hangs_fails_in_one_line(
    mlflow_server, ray_cluster, tmp_path
):
    """Four trials at once (scaling.cpus_per_worker=0.5 on the cluster's 2 CPUs), all reporting to the MLflow
    server on PostgreSQL. Once a first trial has reported its first evaluation, its Train worker is SIGSTOPped (it
    makes no progress, as a deadlock or a read that never returns leaves it): tune.trial_timeout_s stops it and
    marks it failed within the limit of its last metric (plus the time Tune takes to end it), the terminal says so
    in one line naming it, and the sweep goes on: the other three train to their end. (The limit counts from the
    workers' train function, not from the trial's start: a busy cluster's worker-group start is not a hang.)
    Nothing is lost: one nested run per trial, each report Tune got in MLflow once at its step (the hung trial's
    too), and PostgreSQL's own counts agree."""
    limit = 60
    storage, err = ray_cluster.storage / "pg-sweep", tmp_path / "tune.err"
    cmd = [sys.executable, "-m", "dsum.cli", "tune", JOBS / "tiny-dialogsum.yaml", "train.run_name=pgsweep",
           f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=6", "train.warmup_ratio=0", "train.logging_steps=1",
           "train.eval_steps=2", "eval.max_samples=2", "eval.compare_base=false",
           "tune.num_samples=4", f"tune.space={SPACE}", "tune.seed=5", "tune.scheduler=none",
           f"tune.trial_timeout_s={limit}", "scaling.cpus_per_worker=0.5",
           f"scaling.storage_path={storage}", f"tracking.tracking_uri={mlflow_server.url}", "--json"]  # fmt: skip
    with open(tmp_path / "tune.out", "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
                                stdout=o, stderr=e)  # fmt: skip
    proc.logs = tmp_path / "tune.out", err  # (for wait_for's message)
    step = wait_for(lambda: re.search(r"^trial (\w+): step 2:", err.read_text(), re.M), 300, "a first evaluation", proc)
    hung = step.group(1)  # (a trial's Train run is named by its trial id)
    stopped = run_workers(ray_cluster, hung)
    assert stopped, f"trial {hung} ended before its worker could be stopped"
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        failed = wait_for(lambda: re.search(rf"^trial {hung}: failed: (.*)$", err.read_text(), re.M), limit + 120,
                          f"trial {hung} to fail", proc)  # fmt: skip
        waited = time.monotonic() - stopped_at
    finally:
        for pid in stopped:  # (its process is ended with its trial; a stopped one would wait for this)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    message = f"its workers reported no metric for {limit} s (tune.trial_timeout_s); stopped"
    assert failed.group(1).startswith(f"{message} (the whole error: "), failed.group(1)
    assert waited <= limit + 20, waited
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    assert "Traceback" not in err.read_text(), err.read_text()[-3000:]  # (the error file has it)
    # the hung trial's worker was killed with its scratch directory on the worker node; the sweep's driver
    # removed it at the end (dsum.cluster.scratch.reap_nodes), in a task on that node
    assert re.search(r"^ray: removed \d+ scratch director(y|ies) of killed workers \(.+ MiB\) on node \w+ \(.+\)$",
                     err.read_text(), re.M), err.read_text()[-3000:]  # fmt: skip
    assert list(ray_cluster.node_tmp.glob("dsum-worker-*")) == []
    result = json_line((tmp_path / "tune.out").read_text())
    assert result["max_concurrent_trials"] == 4 and len(result["trials"]) == 4
    assert most_at_once(storage / "pgsweep") == 4  # all four were training, and reporting, at one time
    trials = {t["trial_id"]: t for t in result["trials"]}
    assert trials[hung]["error"] == message and trials[hung]["step"] < 6
    assert all(t["error"] is None and t["step"] == 6 for i, t in trials.items() if i != hung), result["trials"]

    assert mlflow_server.backend.startswith("postgresql://")  # the server's store: PostgreSQL's, read below
    client = mlflow_server.client()
    parent = result["tracking"]["run_id"]
    nested = {r.data.tags["dsum.trial_id"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}  # fmt: skip
    assert sorted(nested) == sorted(trials)
    logged = 0
    for trial_id, run in nested.items():
        # every report Tune got from the trial (its result.json) is in MLflow, once, at its step
        reports = [
            json.loads(line) for line in (storage / "pgsweep" / trial_id / "result.json").read_text().splitlines()
        ]
        if trial_id == hung:
            assert run.info.status == "FAILED" and reports and [r["step"] for r in reports] == [2, 4][: len(reports)]
        else:
            assert run.info.status == "FINISHED" and run.data.tags["dsum.steps"] == "6"
            assert [r["step"] for r in reports] == [2, 4, 6], trial_id
        for key in KEPT:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            sent = [(r["step"], pytest.approx(r[key])) for r in reports if isinstance(r.get(key), int | float)]
            assert history == sent, (trial_id, key)
            logged += len(history)
    assert logged >= 3 * 3 + 1  # (an eval_loss at each report, at least)
    # the same, counted by PostgreSQL: the sweep's five runs, and each metric point once
    ids = ", ".join(f"'{r.info.run_id}'" for r in nested.values())
    assert _in_database(mlflow_server, f"SELECT count(*) FROM runs WHERE run_uuid IN ({ids}, '{parent}');") == "5"
    keys = ", ".join(f"'{k}'" for k in KEPT)
    counted = _in_database(
        mlflow_server, f"SELECT count(*) FROM metrics WHERE run_uuid IN ({ids}) AND key IN ({keys});"
    )
    assert counted == str(logged)


RACE = "dsum-race"
ANY_GAIN = ["--margin", "-1", "--min-ci-low", "-1"]  # copies of one version: a gain of 0 passes


@pytest.fixture(scope="module")
def race_model(mlflow_server, default_run):
    """RACE with versions 1-5, each a copy of the session's default run (REGISTERED v1: the same model, run,
    scores and eval set), v1 champion."""
    client = mlflow_server.client()
    source = client.get_model_version(REGISTERED, "1")
    client.create_registered_model(RACE)
    model_id = source.source.removeprefix("models:/")  # (a logged model, registered as registry.register does)
    tags = {k: v for k, v in source.tags.items() if not k.startswith("dsum.promotion.")}  # its eval, no decision
    for _ in range(5):
        client.create_model_version(RACE, source.source, run_id=source.run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(RACE, registry.CHAMPION, "1")
    return client


def _aliases(client) -> dict[str, str]:
    return dict(client.get_registered_model(RACE).aliases)


@pytest.mark.e2e
def test_a_promotion_whose_champion_changed_under_it_says_so_and_changes_nothing(mlflow_server, race_model):
    client = race_model
    seen = registry.compare(client, RACE, "3", -1, -1)  # v3 compared with champion v1 ...
    assert seen["promoted"] and seen["champion"] == "1"
    other = dsum_here("promote", "--model", RACE, "--candidate", "2", *ANY_GAIN, "--tracking-uri", mlflow_server.url,
                      "--json", cwd=ROOT)  # fmt: skip
    assert other.returncode == 0 and json.loads(other.stdout)["promoted"], other.stderr  # ... then v2 promoted
    assert _aliases(client) == {"champion": "2", "previous-champion": "1"}
    with pytest.raises(DsumError) as changed:
        registry.commit(client, seen)
    assert str(changed.value) == (
        f"{RACE}: the registry changed while v3 was compared: the champion was v1, it is v2 now; nothing changed: "
        "run `dsum promote` again to compare with it"
    )
    assert _aliases(client) == {"champion": "2", "previous-champion": "1"}
    assert "dsum.promotion.decision" not in client.get_model_version(RACE, "3").tags
    assert registry.LOCK.format(name=RACE) not in {m.name for m in client.search_registered_models()}  # released


@pytest.mark.e2e
def test_racing_promotions_and_a_rollback_leave_consistent_aliases(mlflow_server, race_model, tmp_path):
    """Three commands at once on the Postgres-backed server (two worker processes): each either succeeds on
    the registry as it found it, or says in one line that it changed under it; the aliases end as the
    successful ones, taken in some order one after another, leave them."""
    client = race_model
    client.set_registered_model_alias(RACE, registry.CHAMPION, "1")
    client.delete_registered_model_alias(RACE, registry.PREVIOUS)
    before = {"champion": "1"}
    common = ["--tracking-uri", mlflow_server.url, "--json"]
    commands = {
        "v4": ["promote", "--model", RACE, "--candidate", "4", *ANY_GAIN, *common],
        "v5": ["promote", "--model", RACE, "--candidate", "5", *ANY_GAIN, *common],
        "rollback": ["rollback", "--model", RACE, *common],
    }
    procs = {
        what: subprocess.Popen([sys.executable, "-m", "dsum.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for what, args in commands.items()
    }  # fmt: skip
    done = {what: (*p.communicate(timeout=300), p.returncode) for what, p in procs.items()}
    succeeded = {}
    for what, (out, err, code) in done.items():
        if code == 0:
            succeeded[what] = json.loads(out)
            continue
        # one line, and a reason that is the registry's state
        assert code == 2 and len(err.strip().splitlines()) == 1, (what, code, err)
        assert "the registry changed while" in err or "no previous-champion to roll back to" in err, (what, err)
    assert {"v4", "v5"} & set(succeeded), done  # the first promotion to take the lock compared with v1 and won
    # Replay the successful commands in every order; one must lead from `before` to the aliases found.
    final = _aliases(client)

    def replay(order: list[str]) -> dict[str, str] | None:
        state = dict(before)
        for what in order:
            decision = succeeded[what]
            if what == "rollback":
                if "previous-champion" not in state or state["previous-champion"] != decision["champion"]:
                    return None
                state = {"champion": state["previous-champion"]}
            else:
                if decision["champion"] != state.get("champion"):
                    return None
                state = {"champion": decision["candidate"], "previous-champion": state["champion"]}
        return state

    assert final in [replay(list(order)) for order in permutations(succeeded)], (final, succeeded)
    assert registry.LOCK.format(name=RACE) not in {m.name for m in client.search_registered_models()}

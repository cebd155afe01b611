"""`dsum tune` on the session's two-node cluster (2 CPUs): four trials, more than the cluster holds at
once; the sweep's driver is SIGKILLed once two trials have finished (the cluster's first round; the next two
are starting) and the same command, sent with `ray job submit`, completes the sweep without training those
two again; the sweep's directory is on the driver's side, which the worker node cannot see; MLflow holds one
parent run and a nested run per trial; best.yaml is a job that validates and trains. Which trials ASHA
stops depends on the order they reach its rungs: Ray's ASHA as dsum sets it up, and ASHA with promotions,
are each checked with trials in a fixed order. A trial that stops reporting (tune.trial_timeout_s) is
test_postgres.py's four-trial sweep's."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fixed_sweeps
import pytest
from conftest import ROOT, dsum_here, json_line, most_at_once, train_workers, trial_processes, wait_for

from dsum import config, train

pytestmark = [pytest.mark.ray, pytest.mark.tune]

# learning rates far apart: at 1e-6 the loss stays where it started, at 3e-3 it falls
SPACE = "{train.learning_rate: {choice: [1.0e-6, 3.0e-3]}, method.r: {choice: [4, 8]}}"


def _sweep_cmd(mlflow_url: str, storage: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dsum.cli", "tune", "jobs/tiny-dialogsum.yaml", "train.run_name=sweep",
            f"train.output_dir={out}",
            "train.max_steps=8", "train.warmup_ratio=0", "train.logging_steps=2",  # 4 evaluations: every 2 steps
            "tune.num_samples=4", f"tune.space={SPACE}", "tune.seed=3", "tune.grace_period=1", "tune.scheduler=asha",
            f"scaling.storage_path={storage}", f"tracking.tracking_uri={mlflow_url}", "--json"]  # fmt: skip


def _checkpoints(sweep_dir: Path) -> dict[str, list[Path]]:
    """Each trial's checkpoints, which Tune keeps in the trial's directory: a one-worker trial trains in its own
    Tune actor (dsum.cluster.tune.trains_in_trial) and reports them to Tune. A directory is named by its trial's
    id, but a trial the killed driver had started after Tune last saved the sweep gets a second one, the id and
    a suffix (dsum.cluster.tune._trial_outcome): both are the trial's, by the id in its reports."""
    found: dict[str, list[Path]] = {}
    for d in sweep_dir.iterdir():
        if d.is_dir() and (d / "result.json").exists() and (rows := (d / "result.json").read_text().splitlines()):
            found.setdefault(json.loads(rows[0])["trial_id"], []).extend(d.glob("checkpoint_*/**/*"))
    return found


def _finished_trials(path: Path) -> set[str]:
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(str(path)).trials if t.status == "TERMINATED"}
    except Exception:  # nothing saved yet
        return set()


def test_sweep_resumes_after_a_killed_driver_and_nests_mlflow_runs(tmp_path, ray_cluster, mlflow_server):
    storage = ray_cluster.storage / "tune"
    cmd = _sweep_cmd(mlflow_server.url, storage, ray_cluster.driver_dir / "sweeps")
    out, err = tmp_path / "first.out", tmp_path / "first.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=o, stderr=e)
    proc.logs = out, err  # (for wait_for's message)
    # Kill the driver once Tune's saved state has two trials finished (what a restore keeps).
    finished = wait_for(lambda: f if len(f := _finished_trials(storage / "sweep")) >= 2 else None, 600,
                        "two trials finished in Tune's saved state", proc, every=1)  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    # killed, not finished: a sweep that had ended on its own would leave nothing to restore
    assert proc.wait() == -signal.SIGKILL, f"the sweep ended before it was killed: {err.read_text()[-2000:]}"
    # the terminal showed the sweep's progress, not what the trials' processes print (Ray's logs keep that)
    shown = err.read_text()
    assert re.search(r"^trial \w+: started, train\.learning_rate=[\d.e-]+, method\.r=\d$", shown, re.M), shown[-3000:]
    assert re.search(r"^trial \w+: step 2: eval_loss \d", shown, re.M), shown[-3000:]
    assert "(RayTrainWorker" not in shown and "(TrainController" not in shown, shown[-3000:]
    # Whatever the killed sweep's trials still wrote happens before this: the cluster ends them first.
    wait_for(lambda: not trial_processes(ray_cluster), 120, "the cluster to end the killed sweep's trials", every=0.5)
    killed_at = time.time()

    again = subprocess.run(ray_cluster.submit(cmd), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "succeeded" in again.stdout + again.stderr, again.stdout[-3000:]
    result = json_line(again.stdout)
    assert result["restored"] and len(result["trials"]) == 4
    trials = {t["trial_id"]: t for t in result["trials"]}
    newest = {t: max(p.stat().st_mtime for p in files) for t, files in _checkpoints(storage / "sweep").items() if files}
    # the trials trained in Tune's own actors: no Ray Train run, no worker left of one
    assert not train_workers(ray_cluster) and not list(storage.glob("*/checkpoint_*"))
    for trial_id in finished:  # kept, not trained again: no new checkpoint
        assert trials[trial_id]["error"] is None
        assert newest[trial_id] < killed_at, f"trial {trial_id} was trained again"
        assert trials[trial_id]["segments"] == 1, trials[trial_id]  # one segment: started, ran out
    # what each trial cost, from its reports to Tune: a trial under way at the kill went on in a second segment
    for t in result["trials"]:
        assert 1 <= t["segments"] <= 2 and 0 < t["startup_s"] < 300 * t["segments"] and t["train_s"] > 0, t
    assert any(newest.get(t, 0) > killed_at for t in set(trials) - finished), "the restored sweep trained nothing"
    assert result["max_concurrent_trials"] == 2  # 2 CPUs, one 1-CPU worker per trial
    assert most_at_once(storage / "sweep") <= 2
    # Which trials Ray's ASHA stops depends on which reaches a rung first (a trial first at a rung always goes
    # on: test_ray_asha_stops_a_trial_behind_the_rungs_best), which two trials in parallel make a matter of
    # timing: so this checks that the rows agree with what happened, whichever order it was.
    best_loss = min(t["eval_loss"] for t in result["trials"] if t["eval_loss"] is not None)
    for t in result["trials"]:
        assert (t["step"] < 8 and t["eval_loss"] > best_loss) if t["stopped_early"] else t["step"] == 8, t
    best = result["best"]
    assert best["params"]["train.learning_rate"] == 3e-3 and best["eval_loss"] == min(
        t["eval_loss"] for t in result["trials"] if t["eval_loss"] is not None
    )

    client = mlflow_server.client()
    # MLflow: one parent run holding the table and the best job; one nested run per trial
    parent = client.get_run(result["tracking"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dsum.best_trial"] == best["trial_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/table.txt", "sweep/trials.json", "sweep/best.yaml"} <= artifacts
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["dsum.trial_id"] for r in nested) == sorted(trials)
    stopped = {r.data.tags["dsum.trial_id"]: r.data.tags["dsum.stopped_early"] for r in nested}
    for r in nested:  # what the trial cost, beside its outcome
        t = trials[r.data.tags["dsum.trial_id"]]
        assert {k: r.data.metrics[k] for k in ("segments", "startup_s", "train_s")} == {
            k: t[k] for k in ("segments", "startup_s", "train_s")
        }
        assert r.data.metrics["startup_model_s"] == t["startup_parts"]["model_s"]
    assert stopped == {t: str(trials[t]["stopped_early"]).lower() for t in trials}

    # best.yaml: the best trial's job, which validates and trains
    best_job = Path(result["best_job"])
    assert dsum_here("validate", best_job, cwd=tmp_path).returncode == 0
    job = config.load(best_job, ["train.max_steps=2", "train.eval_steps=null", "tracking.enabled=false"])
    assert job.train.learning_rate == 3e-3 and job.method.r == best["params"]["method.r"]
    _, trained = train.fit(job, tmp_path / "best")
    assert trained.global_step == 2 and os.path.exists(tmp_path / "best")


def test_ray_asha_stops_a_trial_behind_the_rungs_best(ray_client, ray_cluster):
    """tune.scheduler: asha, as dsum builds it for the sweep above (8 steps, an evaluation every
    2, grace period 1, reduction factor 2: rungs at steps 2, 4 and 8), on Ray Tune itself, one trial at a
    time so that the order is fixed (tests/fixed_sweeps.py): losses 7, 8, 5, 6.5 in that order. Ray's ASHA
    (ray/tune/schedulers/async_hyperband.py, _Bracket.on_result) stops a trial at a rung when its result is
    below the (1 - 1/rf) percentile of those recorded there before it: 7 goes on (first everywhere); 8 stops
    at step 2 (behind 7); 5 goes on (median of 7 and 8 is 7.5; at step 4 only 7 is there); 6.5 passes step 2
    (median of 7, 8, 5 is 7) and stops at step 4 (median of 7 and 5 is 6)."""
    tuner, expected = fixed_sweeps.tuner("asha", ray_cluster.storage / "asha")
    grid = tuner.fit()
    assert fixed_sweeps.steps(grid) == expected == {7.0: 8, 8.0: 2, 5.0: 8, 6.5: 4}
    assert not grid.errors


def test_asha_promotions_pause_at_each_rung_until_a_trial_beats_the_others(ray_client, ray_cluster):
    """tune.scheduler: asha-promote on Ray Tune itself, one trial at a time so that the order is fixed:
    six trials whose loss stays where it starts (5, 3, 6, 1, 4, 2 in the order they run), rungs at steps 1
    and 3 (reduction factor 3), 9 steps at most. A trial goes on from a rung only when it is in the top
    third of the results there, else it pauses; once no trial can reach a rung any more, its best third (at
    least one) go on and the rest stop. So: 5 pauses at step 1 (alone there); 3 pauses; 6 pauses, and 3 is
    promoted (top 1 of 3), resumes from its checkpoint and pauses at step 3 (alone there); 1 goes straight
    on (top 1 of 4) and pauses at step 3 (1 of 2: no one promoted yet); 4 pauses; 2 goes on (top 2 of 6) and
    pauses at step 3; both rungs are then decided: 1 resumes and runs to the end, every other trial stops
    where it paused. (Ray's ASHA lets the first trial at a rung through: 5 would have run 9 steps.)"""
    tuner, expected = fixed_sweeps.tuner("asha-promote", ray_cluster.storage / "asha")
    grid = tuner.fit()
    assert fixed_sweeps.steps(grid) == expected == {5.0: 1, 3.0: 3, 6.0: 1, 1.0: 9, 4.0: 1, 2.0: 3}
    assert grid.get_best_result().config["loss"] == 1.0 and not grid.errors


def test_a_promoted_trial_resumes_where_it_paused_in_a_process_that_has_trained_before(tmp_path, ray_cluster):
    """`dsum tune` with asha-promote (the default) on the cluster's 2 CPUs, one trial at a time (a trial holds
    both: scaling.cpus_per_worker=2): the trial at 3e-3 reaches the rung at step 2 first, alone there, and
    pauses; the one at 1e-6 then reaches it behind it and the rung is decided: 3e-3 is promoted, 1e-6 stops
    there. The promoted trial goes on from its checkpoint at step 2 (its reports: steps 2, 4, 6, 8, each once)
    and both its segments train in the trial's own Tune actor; only the first pays the training stack's
    imports: Tune gives the later segments a process a trial has trained in (reuse_actors)."""
    storage = ray_cluster.storage / "promote"
    cmd = [sys.executable, "-m", "dsum.cli", "tune", "jobs/tiny-dialogsum.yaml", "train.run_name=promote",
           f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=8", "train.warmup_ratio=0", "train.eval_steps=2",
           "tune.num_samples=2", "tune.space={train.learning_rate: {choice: [3.0e-3, 1.0e-6]}}", "tune.seed=1",
           "tune.grace_period=1", "scaling.cpus_per_worker=2", f"scaling.storage_path={storage}",
           "tracking.enabled=false", "--address", ray_cluster.address, "--json"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json_line(done.stdout)
    assert result["max_concurrent_trials"] == 1
    trials = {t["params"]["train.learning_rate"]: t for t in result["trials"]}
    good, flat = trials[3e-3], trials[1e-6]
    # (the seed's order: 3e-3 first; the scheduler stages the second once the first runs, so it reaches the rung alone)
    assert good["trial_id"] < flat["trial_id"]
    assert (flat["step"], flat["stopped_early"], flat["segments"]) == (2, True, 1), flat
    assert (good["step"], good["stopped_early"], good["segments"]) == (8, False, 2), good
    reports = [json.loads(line) for line in (storage / "promote" / good["trial_id"] / "result.json").open()]
    assert [r["step"] for r in reports] == [2, 4, 6, 8]
    # each segment's start-up (the reports but the last, the run's result, carry their segment's)
    imports = {r["trial_segment"]: r["startup_worker_imports_s"] for r in reports if "trial_segment" in r}
    first, resumed = (imports[k] for k in sorted(imports))
    assert first > 1.0 and resumed < 0.2 * first, imports
    assert flat["startup_parts"]["worker_imports_s"] < 0.2 * first, flat  # (in the process 3e-3 paused in)
    assert not train_workers(ray_cluster) and not list(storage.glob("*/checkpoint_*"))  # no Ray Train run


def _saved_trials(path: Path) -> dict[float, tuple[str, int | None]]:
    """Each trial of the sweep at `path` as Tune last saved it: loss → (status, step of its last report)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(path)).trials
    except Exception:  # nothing saved yet
        return {}
    return {t.config["loss"]: (t.status, (t.last_result or {}).get("step")) for t in trials}


# The trial each sweep stands still before (its gate): the first rungs' decisions are made and saved by then
# (asha: 8 stopped at step 2 behind 7; asha-promote: 5 and 6 paused at step 1, 3 promoted and paused at step 3),
# and the rest are not: with the rungs empty, a restored sweep decides them otherwise (asha: 5 is first at
# every rung, so 6.5 stops at step 2, behind 5 alone; asha-promote: 5, 6 and 3 run on, unpaused).
GATES = {"asha": (5.0, {7.0: ("TERMINATED", 8), 8.0: ("TERMINATED", 2)}),
         "asha-promote": (1.0, {5.0: ("PAUSED", 1), 3.0: ("PAUSED", 3), 6.0: ("PAUSED", 1)})}  # fmt: skip


@pytest.mark.parametrize("kind", ["asha", "asha-promote"])
def test_a_sweep_restored_after_its_driver_died_decides_as_the_uninterrupted_one(kind, ray_cluster, tmp_path):
    """The sweeps of the two tests above, each in a driver of its own that is SIGKILLed once its first
    decisions are saved (the next trial waits at a gate meanwhile), then run again: Tune restores the trials
    but not a scheduler's rungs (ray 2.60, tune_controller.py: save_to_dir saves the searcher's and the
    callbacks' state only), so dsum's sweep callback carries them. The restored sweep stops the same trials
    at the same steps as the uninterrupted one."""
    storage = ray_cluster.storage / f"restore-{kind}"
    gated, before = GATES[kind]
    gate = storage / "gate"
    cmd = [sys.executable, str(ROOT / "tests/fixed_sweeps.py"), kind, str(storage), str(gated), str(gate)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    out, err = tmp_path / "first.out", tmp_path / "first.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e)
    proc.logs = out, err  # (for wait_for's message)
    # Tune saves the sweep every few seconds: kill once the saved state has the first decisions and the trial
    # at the gate (which stands still: nothing after it is decided before the kill)
    saved = wait_for(lambda: s if (s := _saved_trials(storage / kind)).items() >= before.items() and gated in s else None,
                     300, f"Tune's saved state to show {before} and the trial of loss {gated}", proc, every=0.5)  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the sweep ended before it was killed: {err.read_text()[-2000:]}"
    assert saved[gated][1] is None, saved  # the gated trial had not reported
    gate.touch()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["restored"] and result["errors"] == 0
    # the steps the uninterrupted sweeps end at (the tests above)
    assert {float(loss): step for loss, step in result["steps"].items()} == fixed_sweeps.EXPECTED[kind]

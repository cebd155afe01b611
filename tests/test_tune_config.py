"""`dsum tune` input: the search space in the job's tune section, checked before any trial starts (each
mistake one line naming the file and the key), and the trial jobs it makes."""

import pytest
from conftest import JOBS, dsum_here

from dsum import config, sweep

JOB = JOBS / "tiny-dialogsum.yaml"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["tune.space.method.rr={choice: [4]}"], "tune.space.method.rr: unknown key (did you mean method.r?)"),
        (["tune.space.train.learning_rate={uniform: [0.1, 0.1]}"], "tune.space.train.learning_rate: empty range"),
        (["tune.space.method.r={choice: []}"], "tune.space.method.r: choice needs a non-empty list"),
        (["tune.space.train.learning_rate={loguniform: [0, 0.1]}"], "loguniform bounds must be > 0"),
        (["tune.space.method.r={normal: [1, 2]}"], "tune.space.method.r: one of {choice: ..."),
        (["tune.num_samples=0"], "tune.num_samples: Input should be greater than 0"),
        (["train.eval_steps=600"], "tune.metric: train.eval_steps (600) is past train.max_steps (500)"),
        (["train.eval_steps=5", "tune.space.method.r={choice: [0, 8]}"], "tune.space.method.r=0 makes an invalid job"),
        (
            ["train.eval_steps=5", "tune.metric=eval_rougeL"],
            "eval_rougeL is reported only with train.eval_rouge_samples",
        ),
        (["tune.metric=rouge"], "tune.metric: Input should be 'eval_loss' or 'eval_rougeL'"),
        (["tune.trial_timeout_s=0"], "tune.trial_timeout_s: Input should be greater than 0"),
        (["tune.trial_timeout_s=soon"], "tune.trial_timeout_s: Input should be a valid number"),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_trial(tmp_path, overrides, expected):
    proc = dsum_here("tune", JOB, *overrides, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dsum: error: {JOB}: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), "nothing starts"


def test_trial_jobs_take_the_values_and_tie_alpha_to_r():
    job = config.load(JOB, ["train.eval_steps=5"])
    assert job.tune.space == config.default_space()
    trial = sweep.trial_job(job, {"method.r": 8, "train.learning_rate": 1e-3})
    assert (trial.method.r, trial.method.alpha, trial.train.learning_rate) == (8, 16, 1e-3)
    assert sweep.trial_job(job, {"method.r": 4, "method.alpha": 4}).method.alpha == 4  # searched: not tied
    assert job.optimizer_steps(train_rows=288) == 500  # ASHA's max_t: the job's max_steps
    # by epochs: 2 passes over 288 rows at a global batch of 8 (micro 8 × 1 worker)
    assert config.load(JOB, ["train.max_steps=null", "train.epochs=2"]).optimizer_steps(train_rows=288) == 72


def test_a_job_without_evaluations_is_swept_as_it_is():
    """`dsum tune JOB` needs no train.eval_steps: a trial evaluates sweep.EVALUATIONS times (every tiny job
    passes the sweep's checks as written)."""
    for path in sorted(JOBS.glob("tiny-*.yaml")):
        job = config.load(path)
        sweep.check(job, str(path))
        # shortened for a first try, as the README does: the warmup is a share of the steps, so still below them
        short = config.load(path, ["tune.num_samples=2", "train.max_steps=10"])
        sweep.check(short, str(path))
        assert short.train.warmup_for(10) < 10, path
        if job.train.eval_steps is None:
            swept = sweep.with_evaluations(job, train_rows=288)
            assert swept.train.eval_steps == job.optimizer_steps(288) // sweep.EVALUATIONS, path
    assert sweep.with_evaluations(config.load(JOB, ["train.eval_steps=7"]), 288).train.eval_steps == 7
    assert (
        sweep.with_evaluations(config.load(JOB, ["train.max_steps=2", "train.warmup_ratio=0"]), 288).train.eval_steps
        == 1
    )


def test_trials_rank_by_the_metric_and_those_without_it_come_last():
    def trial(trial_id, value, **cost):
        return sweep.Trial(trial_id, {"method.r": 8}, value, 6, False, None, **cost)

    cost = {"segments": 2, "startup_s": 21.04, "train_s": 3.5, "startup_parts": {"model_s": 0.2}}
    trials = [trial("a", 2.0, **cost), trial("b", None), trial("c", 1.5), trial("d", float("nan"))]
    assert [t.trial_id for t in sweep.rank(trials, "min")] == ["c", "a", "b", "d"]
    assert [t.trial_id for t in sweep.rank(trials, "max")] == ["a", "c", "b", "d"]
    # as sweep.json holds a trial: the metric under its name, then what the trial cost
    assert trials[0].as_dict("eval_loss") == {"trial_id": "a", "params": {"method.r": 8}, "eval_loss": 2.0,
                                              "step": 6, "stopped_early": False, "error": None, **cost}  # fmt: skip
    lines = sweep.table(sweep.rank(trials, "min"), "eval_loss", ["method.r"]).splitlines()
    assert lines[0].split() == ["trial", "method.r", "eval_loss", "steps", "early", "stop", "starts", "start-up", "s",
                                "train", "s"]  # fmt: skip
    assert lines[1].split() == ["c", "8", "1.5000", "6", "-", "-", "-"] and lines[3].split()[:4] == ["b", "8", "-", "6"]
    assert lines[2].split() == ["a", "8", "2.0000", "6", "2", "21.0", "3.5"]


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_searchers_sample_inside_the_space_and_repeat_with_the_seed(search):
    from dsum.cluster import tune as cluster_tune

    space = "{method.r: {choice: [4, 8]}, train.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}, train.seed: {randint: [0, 5]}}"
    job = config.load(JOB, ["train.eval_steps=5", f"tune.space={space}", f"tune.search={search}", "tune.seed=7"])

    spec = {"params": {k: cluster_tune._domain(v) for k, v in job.tune.space.items()}}

    def draws(concurrency=6):
        searcher = cluster_tune._searcher(job, concurrency)
        if search == "optuna":  # Tune wraps a Searcher in its ConcurrencyLimiter itself
            searcher.set_search_properties("eval_loss", "min", spec)
            return [searcher.suggest(f"t{i}")["params"] for i in range(6)]
        searcher.add_configurations({"draws": {"run": lambda config: None, "config": spec, "num_samples": 6}})
        return [t.config["params"] for _ in range(6) if (t := searcher.next_trial()) is not None]

    first = draws()
    assert first == draws()  # seeded
    for p in first:
        assert p["method.r"] in (4, 8) and 1e-5 <= p["train.learning_rate"] <= 1e-2 and 0 <= p["train.seed"] < 5
        sweep.trial_job(job, p)  # every draw is a valid job
    assert len({p["train.learning_rate"] for p in first}) > 1
    if search == "random":  # the generator holds the cluster's concurrency: no third trial while two run
        assert len(draws(concurrency=2)) == 2


def test_schedulers_take_their_rungs_from_the_job():
    """Rungs in optimizer steps: the grace period counts evaluations; Ray's ASHA and ASHA with promotions
    get the same ones. With promotions the random search has no limit of its own (paused trials would
    hold its slots); the scheduler holds the cluster's."""
    from ray.tune.schedulers import ASHAScheduler

    from dsum.cluster import tune as cluster_tune
    from dsum.cluster.asha import PromotingASHA

    base = ["train.max_steps=48", "train.eval_steps=3", "tune.grace_period=1", "tune.reduction_factor=3"]
    ray_asha = cluster_tune._scheduler(config.load(JOB, [*base, "tune.scheduler=asha"]), 48, 2)
    assert isinstance(ray_asha, ASHAScheduler) and [r[0] for r in ray_asha._brackets[0]._rungs] == [27, 9, 3]
    promote = cluster_tune._scheduler(config.load(JOB, base), 48, 2)  # the default
    assert isinstance(promote, PromotingASHA) and promote.milestones == [3, 9, 27]
    # trials in their own actors: Tune's resources hold two at once, a third waits staged for a process to reuse
    assert (promote._limit, promote._ahead) == (2, 1)
    on_train = config.load(JOB, [*base, "tune.scheduler=asha-promote", "tune.trial_timeout_s=60"])
    on_train = cluster_tune._scheduler(on_train, 48, 2)  # 0-CPU trial actors: the scheduler holds two, no more
    assert (on_train._limit, on_train._ahead) == (2, 0)
    # fewer at once than the cluster holds: the scheduler holds them to that
    held = cluster_tune._scheduler(config.load(JOB, [*base, "tune.max_concurrent_trials=1"]), 48, 1)
    assert (held._limit, held._ahead) == (1, 0)
    assert cluster_tune._scheduler(config.load(JOB, [*base, "tune.scheduler=none"]), 48, 2) is None
    assert cluster_tune._searcher(config.load(JOB, base), None).max_concurrent == 0


@pytest.mark.parametrize(
    "overrides,in_trial",
    [
        ([], True),
        (["scaling.num_workers=2"], False),
        (["scaling.strategy=deepspeed-zero2"], False),
        (["tune.trial_timeout_s=60"], False),
        (["scaling.use_gpu=true"], True),
    ],
)
def test_one_process_trials_train_in_their_own_actor_with_one_workers_resources(overrides, in_trial):
    """A trial whose run is one process trains in its Tune actor, which holds what Ray Train's one worker would;
    more workers, DeepSpeed (torch.distributed) and a hang watchdog (which must live outside the process it
    watches) keep Ray Train."""
    from dsum.cluster import tune as cluster_tune

    job = config.load(JOB, ["train.eval_steps=10", "scaling.cpus_per_worker=2", "scaling.resources_per_worker={disk: 1}",
                            *overrides])  # fmt: skip
    assert cluster_tune.trains_in_trial(job) is in_trial
    gpu = {"GPU": 1} if job.scaling.use_gpu else {}
    held = {"CPU": 2, **gpu, "disk": 1} if in_trial else {"cpu": 0, "memory": 1}  # (else its workers hold them)
    assert cluster_tune._trial_resources(job) == held

"""Two sweeps on Ray Tune whose trials run one at a time in a fixed order and report fixed losses, so that
which trials each of dsum's schedulers stops is known in advance (tests/test_tune.py works each outcome out
from Ray's source). Built as `dsum tune` builds a sweep: dsum's scheduler for the job, and
dsum.cluster.tune.tuner_for (the relay callback that saves the scheduler's state; a restore when the sweep's
state is there).

    python tests/fixed_sweeps.py asha|asha-promote STORAGE [GATED_LOSS GATE_FILE]

runs one as a driver of its own on the cluster at RAY_ADDRESS (restoring it when STORAGE holds it already)
and prints {"restored": ..., "steps": {loss: last step}} as its last line. With a gate, the trial of that
loss waits before its first step until GATE_FILE exists: the sweep stands still at a known point, where a
test can kill its driver.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Ray's ASHA as dsum sets it up for an 8-step job evaluated every 2 steps (rungs at steps 2, 4 and 8)
ASHA_LOSSES = [7.0, 8.0, 5.0, 6.5]
ASHA_STEPS = {7.0: 8, 8.0: 2, 5.0: 8, 6.5: 4}
# ASHA with promotions: rungs at steps 1 and 3 (reduction factor 3), 9 steps at most
PROMOTE_LOSSES = [5.0, 3.0, 6.0, 1.0, 4.0, 2.0]
PROMOTE_STEPS = {5.0: 1, 3.0: 3, 6.0: 1, 1.0: 9, 4.0: 1, 2.0: 3}
EXPECTED = {"asha": ASHA_STEPS, "asha-promote": PROMOTE_STEPS}


def _trainable(max_steps: int, gate: tuple[float, str] | None):
    def trainable(config):
        from ray import tune

        step = 0
        if checkpoint := tune.get_checkpoint():  # a promoted or restored trial goes on from where it was
            with checkpoint.as_directory() as d:
                step = int(Path(d, "step").read_text())
        while gate and config["loss"] == gate[0] and not Path(gate[1]).exists():
            time.sleep(0.2)
        while step < max_steps:
            step += 1
            with tempfile.TemporaryDirectory() as d:
                Path(d, "step").write_text(str(step))
                report = {"step": step, "eval_loss": config["loss"]}
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    return trainable


def tuner(kind: str, storage: Path, gate: tuple[float, str] | None = None):
    """The sweep `kind` in `storage`: (its Tuner, the step each loss ends at)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from dsum import config
    from dsum.cluster import tune as cluster_tune
    from dsum.cluster.asha import PromotingASHA

    if kind == "asha":
        overrides = ["train.max_steps=8", "train.eval_steps=2", "train.warmup_ratio=0", "tune.grace_period=1",
                     "tune.reduction_factor=2", "tune.scheduler=asha"]  # fmt: skip
        scheduler = cluster_tune._scheduler(config.load(ROOT / "jobs/tiny-dialogsum.yaml", overrides), 8, 1)
        losses, expected, max_steps, searcher = ASHA_LOSSES, ASHA_STEPS, 8, BasicVariantGenerator(max_concurrent=1)
    else:
        scheduler = PromotingASHA("step", "eval_loss", "min", max_t=9, grace_period=1, reduction_factor=3, limit=1)
        losses, expected, max_steps, searcher = PROMOTE_LOSSES, PROMOTE_STEPS, 9, BasicVariantGenerator()
    built = cluster_tune.tuner_for(
        tune.with_resources(_trainable(max_steps, gate), {"cpu": 1}),
        str(storage),
        kind,
        param_space={"loss": tune.grid_search(losses)},
        tune_config=tune.TuneConfig(
            metric="eval_loss",
            mode="min",
            scheduler=scheduler,
            search_alg=searcher,
            reuse_actors=kind != "asha",  # a trial may start in the process a stopped one left
        ),
    )
    return built, expected


def steps(grid) -> dict[float, int]:
    return {r.config["loss"]: r.metrics["step"] for r in grid}


if __name__ == "__main__":
    import ray
    from ray import tune

    kind, storage = sys.argv[1], Path(sys.argv[2])
    ray.init(log_to_driver=False)
    restored = tune.Tuner.can_restore(str(storage / kind))
    built, _ = tuner(kind, storage, (float(sys.argv[3]), sys.argv[4]) if len(sys.argv) > 4 else None)
    grid = built.fit()
    print(json.dumps({"restored": restored, "steps": steps(grid), "errors": len(grid.errors)}))

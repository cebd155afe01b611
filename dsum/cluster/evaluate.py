"""An evaluation's generation spread over the Ray cluster (eval.workers > 0): a Ray Data pipeline of the
evaluation's work (dsum.eval.predict.Work: one batch of one model), streamed through `map_batches` to a pool
of eval.workers actors. Each actor loads the models once (predict.Predictor) from the run's final weights,
which reach it through Ray's object store (the worker's node need not see the driver's disk), and hands back
each batch's outputs as it ends; the driver keeps them as they arrive (predict._Kept). The batches are the ones
a one-process evaluation makes, so the predictions are the same.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dsum.config import JobConfig
from dsum.eval.predict import Runner, Work


def runner(job: JobConfig) -> Runner | None:
    """The job's runner for dsum.eval.predict: the cluster's when eval.workers asks for one, else None (in
    this process). Call it once connected to Ray: a pool the cluster can never hold is a one-line error now,
    before the evaluation makes its folder."""
    if not job.eval.workers:
        return None
    from dsum.cluster import launch

    cpus = launch.eval_cpus(job)
    shape = {"CPU": cpus} | ({"GPU": 1.0} if job.scaling.use_gpu else {})
    return functools.partial(on_cluster, workers=launch.eval_workers(job, shape), cpus=cpus)


def on_cluster(
    job: JobConfig,
    weights: Path,
    work: list[Work],
    split: Sequence[str],
    workers: int,
    cpus: float,
    times: list | None = None,
) -> Iterator[tuple[Work, list]]:
    """The Runner, with a pool of `workers` actors of `cpus` CPUs each (and one GPU each with scaling.use_gpu);
    `times`, where given, gets each batch's {"ready": when its worker had loaded the models, "ended": when the
    batch was generated} (time.time() on the worker's node; bench P7)."""
    import ray

    shipped = ray.put({str(p.relative_to(weights)): p.read_bytes() for p in weights.rglob("*") if p.is_file()})
    # the longest batches first (batches are numbered by prompt length), so the pool's last batches are short
    # ones: fewer workers wait at the end
    order = sorted(work, key=lambda w: (-w.batch, w.kind))
    items = [{"work": json.dumps({"kind": w.kind, "batch": w.batch, "positions": list(w.positions),
                                  "texts": [split[i] for i in w.positions]})} for w in order]  # fmt: skip
    workers = min(workers, len(items))
    data = _quiet_data_context()
    pipeline = data.from_items(items, override_num_blocks=len(items)).map_batches(
        _Generator,
        fn_constructor_kwargs={
            "job": job.to_dict(),
            "weights": [shipped],
            "kinds": sorted({w.kind for w in work}),
            "threads": None if job.scaling.use_gpu else max(1, int(cpus)),
        },
        batch_size=1,
        compute=data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=1 if job.scaling.use_gpu else 0,  # (GPU: one per worker)
    )
    by_key = {(w.kind, w.batch): w for w in work}
    for row in pipeline.iter_rows():
        done = json.loads(row["done"])
        if times is not None:
            times.append({"ready": done["ready"], "ended": done["ended"]})
        yield by_key[(done["kind"], done["batch"])], done["outputs"]


def _quiet_data_context():
    """ray.data, its progress bars and notices off: the evaluation says its progress in lines of its own (Ray
    Data's logs stay in the cluster's log files)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray.data


class _Generator:
    """One actor of the pool: the run's final weights written to its own disk from the object store, the models
    loaded once, then one piece of work per call."""

    def __init__(self, job: dict[str, Any], weights: list, kinds: list[str], threads: int | None):
        import ray

        from dsum.config import from_dict
        from dsum.eval.predict import Predictor

        if threads:  # a CPU worker computes on the CPUs Ray reserved for it, no more
            import torch

            torch.set_num_threads(threads)
        self._dir = tempfile.TemporaryDirectory(prefix="dsum-eval-")
        root = Path(self._dir.name)
        for name, content in ray.get(weights[0]).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        self.predictor = Predictor(from_dict(job, source="<evaluation worker>"), root, kinds)
        self.ready = time.time()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        done = []
        for item in batch["work"]:
            w = json.loads(item)
            outputs = self.predictor(w["kind"], w["texts"])
            done.append(json.dumps(w | {"texts": None, "outputs": outputs, "ready": self.ready, "ended": time.time()}))
        return {"done": np.array(done, dtype=object)}

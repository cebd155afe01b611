"""What runs only on a CUDA GPU: written here, skipped without one (never faked on the CPU)."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import JOBS, dsum, json_line

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_on_a_gpu_each_evaluation_worker_takes_a_gpu_and_predicts_what_one_process_does(tmp_path):
    """The tiny job trained on the GPU, then evaluated twice: in the driver's process (on the GPU) and by a
    pool of one Ray Data worker holding one GPU (scaling.use_gpu, eval.workers=1, on a Ray of the command's
    own that sees the GPU): the same predictions."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["scaling.use_gpu=true", "tracking.enabled=false"]
    proc = dsum("train", JOBS / "tiny-dialogsum.yaml", "train.max_steps=20", "eval.max_samples=8", *common,
                "--json", cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(json.loads(proc.stdout)["run_dir"])
    outputs = {}
    for name, extra in (("one process", []), ("one GPU worker", ["eval.workers=1"])):
        proc = dsum("eval", "--run", run, "--max-samples", "8", *common, *extra, "--json", cwd=tmp_path, env=env)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        lines = Path(json.loads(proc.stdout)["predictions"]).read_text().splitlines()
        outputs[name] = [(r["base"], r["tuned"]) for r in map(json.loads, lines)]
    assert outputs["one process"] == outputs["one GPU worker"] and len(outputs["one process"]) == 8


def test_on_a_gpu_each_trial_of_a_sweep_holds_a_gpu_in_its_own_actor(tmp_path):
    """`dsum tune` with scaling.use_gpu on a Ray of the command's own: a one-process trial trains in its Tune
    actor, which holds the worker's GPU (dsum.cluster.tune._trial_resources), so no more trials run at once
    than there are GPUs, and every trial ends without an error, the best at its last step."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = dsum("tune", JOBS / "tiny-dialogsum.yaml", "train.max_steps=8", "train.eval_steps=2", "train.warmup_ratio=0",
                "tune.num_samples=2", "scaling.use_gpu=true", "tracking.enabled=false",
                f"scaling.storage_path={tmp_path / 'ray'}", "--json", cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json_line(proc.stdout)
    assert result["max_concurrent_trials"] == torch.cuda.device_count()
    assert all(t["error"] is None for t in result["trials"]) and result["best"]["step"] == 8, result["trials"]

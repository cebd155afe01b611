"""Ray Train on CPU: DeepSpeed ZeRO-2 over 2 workers matches one process at the same global batch,
ZeRO-3 under 2 workers trains. (2 DDP workers over gloo, the default, train in test_ray_cluster.py; QLoRA
under 2 workers, the Gemma seed job's, in test_seed_architectures.py.) The runs go through the CLI's main() in the test process (conftest.train_here), on
the session's two-node cluster."""

import json

import pytest
from conftest import JOBS

from dsum import config, train

pytestmark = pytest.mark.ray

SHORT = ["train.warmup_steps=0", "eval.max_samples=2", "eval.compare_base=false"]


def _losses(run_dir):
    history = json.loads((run_dir / "train_metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_zero2_over_two_workers_matches_one_process_at_the_same_global_batch(tmp_path, train_here):
    # the default sampler, batch_rebalance, splits a step's 8 examples unevenly between the two workers
    common = [*SHORT, "train.max_steps=12", "train.logging_steps=2", "train.global_batch_size=8"]
    one = config.load(JOBS / "tiny-dialogsum.yaml", [*common, "train.micro_batch_size=8"])
    _, reference = train.fit(one, tmp_path / "one")  # one process, the whole batch
    two = train_here(
        JOBS / "tiny-dialogsum.yaml",
        *common,
        "train.run_name=two",
        "train.micro_batch_size=4",
        "scaling.num_workers=2",
        "scaling.strategy=deepspeed-zero2",
        cwd=tmp_path,
    )
    a = [h["loss"] for h in reference.log_history if "loss" in h]
    b = _losses(tmp_path / "runs/two")
    assert len(a) == len(b) == 6 and reference.global_step == two["global_step"] == 12
    # Same examples per step, split over two workers: the curves agree up to float reduction order.
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 0.02 * x, (a, b)
    ckpts = list((tmp_path / "runs/ray/two").glob("checkpoint_*/checkpoint/adapter_model.safetensors"))
    assert ckpts, "the checkpoint lands in the storage path"
    assert (tmp_path / "runs/two/final/adapter_model.safetensors").exists()
    assert not list((tmp_path / "runs/two/final").glob("optimizer.pt"))


def test_deepspeed_zero3_with_two_cpu_workers(tmp_path, train_here):
    result = train_here(
        JOBS / "tiny-dialogsum.yaml",
        *SHORT,
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "scaling.num_workers=2",
        "scaling.strategy=deepspeed-zero3",
        cwd=tmp_path,
    )
    assert result["global_step"] == 6 and result["train_loss"] > 0
    run = tmp_path / result["run_dir"]
    assert (run / "final/adapter_model.safetensors").stat().st_size > 1000

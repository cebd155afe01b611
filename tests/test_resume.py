"""dsum.cluster.resume's contracts with Ray and transformers that the end-to-end resume tests (a killed
driver, Ctrl-C, a full disk, a named checkpoint: tests/test_ray_cluster.py) rely on without showing."""

import json
import os
from pathlib import Path

import pytest
from conftest import JOBS, dsum
from ray.train.huggingface.transformers import RayTrainReportCallback

from dsum import config
from dsum.cluster import resume


def test_the_checkpoint_name_is_ray_trains():
    # the driver finds the Trainer's checkpoint inside a Ray checkpoint by this name without importing Ray's
    # transformers integration; Ray's callback writes it there
    assert resume.CHECKPOINT_NAME == RayTrainReportCallback.CHECKPOINT_NAME


def test_a_named_checkpoint_is_the_only_one_uploaded(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 3}')
    (ckpt / "adapter_model.safetensors").write_bytes(b"w")
    storage = str(tmp_path / "storage")
    for named in (None, "latest"):  # Ray resumes from its own storage
        job = config.load(JOBS / "tiny-dialogsum.yaml", [f"train.resume_from={named}"] if named else [])
        assert job.train.resume_path is None and resume.upload(job, storage, "r") is None
    job = config.load(JOBS / "tiny-dialogsum.yaml", [f"train.resume_from={ckpt}"])
    uploaded = resume.upload(job, storage, "r")
    with uploaded.as_directory() as d:
        copied = sorted(p.name for p in (Path(d) / resume.CHECKPOINT_NAME).iterdir())
    assert copied == ["adapter_model.safetensors", "trainer_state.json"]
    resume.start_over(storage, "r")
    assert not (tmp_path / "storage/r").exists()


@pytest.mark.e2e
def test_a_run_whose_storage_path_is_a_bucket_checkpoints_there_and_resumes_from_it(bucket, tmp_path):
    """`dsum train` with scaling.storage_path in a bucket, on a Ray of its own: its checkpoints go to the bucket;
    run again with more steps, its worker resumes from the bucket's last one (downloaded by Ray into the node's
    temp dir), and neither run leaves anything there (TMPDIR; Ray's own temp dir stays /tmp/ray)."""
    node_tmp = tmp_path / "tmp"
    node_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(node_tmp), "RAY_TMPDIR": "/tmp"}
    common = ["train.save_steps=2", "train.warmup_ratio=0", "eval.max_samples=2", "eval.compare_base=false",
              "tracking.enabled=false", "train.run_name=bucket", f"scaling.storage_path={bucket}", "--json"]  # fmt: skip
    results = []
    for steps in (4, 6):
        proc = dsum("train", JOBS / "tiny-dialogsum.yaml", f"train.max_steps={steps}", *common, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.splitlines()[-1]))
        assert list(node_tmp.iterdir()) == [], sorted(node_tmp.iterdir())
    assert results[0]["global_step"] == 4 and results[1]["resumed_from_step"] == 4 and results[1]["global_step"] == 6
    import boto3

    host = bucket.split("endpoint_override=")[1].split("&")[0]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=f"http://{host}", region_name="us-east-1")
            .list_objects_v2(Bucket="dsum", Prefix="runs/bucket/")["Contents"]]  # fmt: skip
    assert any(k.endswith(f"/{resume.CHECKPOINT_NAME}/trainer_state.json") for k in keys), keys
    assert (tmp_path / "runs/bucket/final/adapter_model.safetensors").exists()

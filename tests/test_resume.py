"""dsum.cluster.resume's contracts with Ray and transformers that the end-to-end resume tests (a killed
driver, Ctrl-C, a full disk, a named checkpoint: tests/test_ray_cluster.py) rely on without showing."""

from pathlib import Path

import pytest
from conftest import JOBS, s3_client
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


@pytest.mark.ray
def test_a_run_whose_storage_path_is_a_bucket_checkpoints_there_and_resumes_from_it(bucket, ray_cluster, train_here,
                                                                                    tmp_path):  # fmt: skip
    """`dsum train` with scaling.storage_path in a bucket, on the session's cluster, whose worker node sees the
    bucket and not the driver's disk: the checkpoints go to the bucket; run again with more steps, the worker
    resumes from the bucket's last one (downloaded by Ray into the node's temp dir), and neither run leaves
    anything of it in the worker node's TMPDIR."""
    common = ["train.save_steps=2", "train.warmup_ratio=0", "eval.max_samples=2", "eval.compare_base=false",
              "tracking.enabled=false", "train.run_name=bucket", f"scaling.storage_path={bucket}"]  # fmt: skip
    cwd = ray_cluster.driver_dir / "bucket"
    cwd.mkdir()
    first = train_here(JOBS / "tiny-dialogsum.yaml", "train.max_steps=4", *common, cwd=cwd)
    second = train_here(JOBS / "tiny-dialogsum.yaml", "train.max_steps=6", *common, cwd=cwd)
    assert first["global_step"] == 4 and second["resumed_from_step"] == 4 and second["global_step"] == 6, second
    left = [p.name for p in ray_cluster.node_tmp.iterdir() if p.name.startswith(("checkpoint_tmp_", "dsum-worker-"))]
    assert left == []
    endpoint = bucket.split("endpoint_override=")[1].split("&")[0]
    listed = s3_client(endpoint).list_objects_v2(Bucket="dsum", Prefix="runs/bucket/")
    keys = [o["Key"] for o in listed["Contents"]]
    assert any(k.endswith(f"/{resume.CHECKPOINT_NAME}/trainer_state.json") for k in keys), keys
    assert (cwd / "runs/bucket/final/adapter_model.safetensors").exists()

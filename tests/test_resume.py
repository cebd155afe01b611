"""dsum.cluster.resume's contracts with Ray and transformers that the end-to-end resume tests (a killed
driver, Ctrl-C, a full disk, a named checkpoint: tests/test_ray_cluster.py) rely on without showing."""

from pathlib import Path

from conftest import JOBS
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

"""`dsum fetch`: put a job's base model and hub dataset where later loads find them without downloading, in
the Hugging Face cache (HF_HOME). On a cluster whose pods share that cache on a volume (k8s/), a RayJob does
this first, once, so that its workers, or a sweep's trials, don't each download the model.

Imports neither torch nor transformers (a RayJob pays this step's start-up before every run): tiny presets
and local directories need nothing, a hub model is a snapshot of its repository (huggingface_hub), a hub
dataset is what `datasets` caches when it loads it.
"""

from __future__ import annotations

from pathlib import Path

from dsum.config import DataConfig, ModelConfig
from dsum.errors import DsumError, one_line

OTHER_WEIGHTS = ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf", "*.tflite", "original/*"]
"""Files of other frameworks and formats that from_pretrained never reads when a repo has safetensors."""


def model(cfg: ModelConfig) -> str:
    """The base model into the Hugging Face cache; returns what was done, in words."""
    if cfg.is_preset:
        return f"{cfg.name}: a preset, built from config where it is loaded; nothing to download"
    if Path(cfg.name).is_dir():
        return f"{cfg.name}: a local directory, nothing to download"
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:  # nothing to download: is it in the cache?
            path = snapshot_download(cfg.name, revision=cfg.revision, local_files_only=True)
            return f"{cfg.name}: in the Hugging Face cache (offline), {path}"
        files = HfApi().list_repo_files(cfg.name, revision=cfg.revision)
        skip = OTHER_WEIGHTS if any(f.endswith(".safetensors") for f in files) else []
        path = snapshot_download(cfg.name, revision=cfg.revision, ignore_patterns=skip)
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        raise DsumError(f"model.name: could not download {cfg.name!r}: {one_line(e)}") from None
    return f"{cfg.name}: in the Hugging Face cache, {path}"


def data(cfg: DataConfig) -> str:
    """A hub dataset into the datasets cache; local and bundled data need nothing."""
    from dsum.data import BUNDLED, LOCAL_SUFFIXES

    if cfg.files or cfg.source in BUNDLED or Path(cfg.source).suffix.lower() in LOCAL_SUFFIXES:
        return f"{'data.files' if cfg.files else cfg.source}: local, nothing to download"
    if Path(cfg.source).exists():
        return f"{cfg.source}: local, nothing to download"
    from dsum.data import _load_hub

    _load_hub(cfg)
    return f"{cfg.source}: in the datasets cache"

"""Deciding before doing: `dsum train --dry-run` (what a job would do, without loading data or downloading
weights) and the driver's preflight checks.

Parameter counts come from a model built on the meta device: for a tiny preset, for a hub model whose
config is in the local cache, or for a seed job's model (its shape is in dsum.architectures). Otherwise
they are reported as unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsum import model as models
from dsum.architectures import known_config, share_embeddings
from dsum.config import JobConfig
from dsum.errors import one_line


def plan(job: JobConfig, memory: bool = False, gpu_memory: int | None = None) -> dict[str, Any]:
    """What the job would do; with `memory`, the per-device memory planned on the meta-device model (see
    dsum.memory), and with gpu_memory (bytes) the settings recommended to fit it."""
    m, t = job.method, job.train
    out: dict[str, Any] = {
        "job": job.name,
        "model": job.model.name + (f"@{job.model.revision}" if job.model.revision else ""),
        "task": job.model.task,
        "method": m.name + (f" ({m.bits}-bit {m.quant_type if m.bits == 4 else 'int8'})" if m.bits else ""),
        "data": ", ".join(f"{k}={v}" for k, v in job.data.files.items()) if job.data.files else job.data.source,
        "steps": t.max_steps if t.max_steps else f"{t.epochs} epochs",
        "micro_batch": t.micro_batch_size,
        "grad_accum": job.batches.accumulation,
        "global_batch": job.batches.global_size,
        "workers": job.scaling.num_workers,
        "strategy": job.scaling.strategy,
        "optimizer": t.optimizer,
        "learning_rate": t.learning_rate,
    }
    skeleton = meta_model(job)
    if skeleton is None:
        out["target_modules"] = m.target_modules if m.name != "full" else "all weights"
        out["trainable_params"] = "unknown (model config not in the local cache)"
        if memory:
            out["memory"] = "unknown (model config not in the local cache)"
        return out
    quantized = quantized_weights(job, skeleton) if memory else frozenset()
    if m.name != "full":
        skeleton = models.apply_method(skeleton, job.model.task, m.model_copy(update={"bits": None}))
        out["target_modules"] = models.adapted_modules(skeleton)
    else:
        out["target_modules"] = "all weights"
    out |= models.parameter_counts(skeleton)
    if memory:
        from dsum.memory import plan_memory

        out["memory"] = plan_memory(job, skeleton, gpu_memory, quantized)
    return out


def quantized_weights(job: JobConfig, skeleton) -> frozenset[int]:
    """ids of the weights a load at method.bits puts in k bits (none without bits), as transformers' quantizer
    picks the layers (dsum.model.quantized_layers); taken before peft wraps the skeleton, whose weights stay
    the same tensors under its wrappers."""
    if not job.method.bits:
        return frozenset()
    return frozenset(id(skeleton.get_submodule(name).weight) for name in models.quantized_layers(skeleton, job.method))


def preflight(job: JobConfig):
    """Everything that can be checked before workers start, so that a mistake is one line and nothing
    runs: the evaluation's encoders are encoders, the checkpoint to resume from is readable, quantization
    is usable, the target modules exist (on a weightless copy of the model). Returns the data, loaded,
    cleaned and tokenized once for all workers (a bad row stops here too)."""
    from dsum import train
    from dsum.eval.run import check_encoders

    check_encoders(job)
    if job.train.resume_path is not None:
        train.check_checkpoint(job.train.resume_path)
    if job.method.bits:
        models.quantization_config(job.method)
    skeleton = meta_model(job)
    if skeleton is not None and job.method.bits:
        models.check_quantizable(skeleton, job.model, job.method)
    if skeleton is not None and job.method.name != "full":
        models.apply_method(skeleton, job.model.task, job.method.model_copy(update={"bits": None}))
    return train.prepare_data(job)


def meta_model(job: JobConfig):
    import transformers
    from accelerate import init_empty_weights

    path = job.model.name
    try:
        if job.model.is_preset:
            path = models.resolve_path(job.model)
        cfg = transformers.AutoConfig.from_pretrained(
            path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code, local_files_only=True
        )
    except OSError:  # not in the local cache: a seed model's shape is written in the project
        cfg = known_config(job.model.name)
        if cfg is None:
            return None
    except ValueError as e:  # a local directory that is not a model (no config.json, no model_type)
        raise models.ModelError(f"model.name: {job.model.name!r} is not a model: {one_line(e)}") from None
    if job.model.task == "classification":
        cfg.num_labels = job.model.num_labels
    auto = getattr(transformers, models.AUTO_CLASSES[job.model.task])
    # built as the quantized load builds it (Falcon's dense layers as nn.Linear: model.plain_linear_layers)
    with init_empty_weights(), models.plain_linear_layers(cfg.model_type if job.method.bits else None):
        skeleton = auto.from_config(cfg, trust_remote_code=job.model.trust_remote_code)
    skeleton.tie_weights()  # shared embeddings count once, as in the loaded model
    local = Path(str(path)) if Path(str(path)).is_dir() else None  # a checkpoint on disk: its head is read
    share_embeddings(skeleton, local)  # T5: encoder and decoder read the one shared embedding
    return skeleton

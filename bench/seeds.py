"""The seed jobs' models on this machine: built from their architectures (dsum.architectures) with random
weights, trained a few steps through dsum's own training loop (`train.fit`), their peak memory measured
beside `dsum plan`'s estimate for the same job.

With CUDA, the real shapes (or fewer layers, `layers`), on one GPU: peak memory is PyTorch's allocator
peak (max_memory_allocated) compared with the estimate less its runtime reserve. Without CUDA the same code
runs on scaled-down shapes on the CPU: peak memory is the process's peak resident set (ru_maxrss) less what it
held before the model was loaded. Each measurement runs in a fresh process, so one does not see another's
peak.

Every example is as long as the job allows (input_ids of data.max_source_length + data.max_target_length
random tokens, every token a label), which is the sequence the planner assumes.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from queue import Empty

ROOT = Path(__file__).resolve().parents[1]

# Scaled-down shapes for the CPU: the family's structure (grouped-query heads, parallel attention, gated MLP)
# at a width and depth two cores train in seconds.
SCALED = {
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 8192,
    # T5's and DistilBERT's names for the same
    "d_model": 256, "d_ff": 768, "num_heads": 4, "d_kv": 64, "dim": 256, "hidden_dim": 768, "n_heads": 4,
    "n_layers": 2,
}  # fmt: skip
CPU_OVERRIDES = (
    "scaling.use_gpu=false",
    "train.precision=fp32",
    "method.compute_dtype=float32",
    "model.dtype=float32",
    "data.max_source_length=448",
    "data.max_target_length=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.eval_steps=null",
    "train.save_steps=null",
    "eval.batch_size=4",
)
# kind: (seed job, its hub architecture, overrides, shape on the CPU (None: SCALED))
WIDE = {"num_hidden_layers": 2, "hidden_size": 2048, "intermediate_size": 7168, "num_attention_heads": 16,
        "num_key_value_heads": 4}  # fmt: skip
# (fp32: this CPU has no fast bf16 matmul; the 4-bit weights are dequantized to fp32 for each matmul)
P6_CPU = ("data.max_source_length=96", "data.max_target_length=32", "train.micro_batch_size=1",
          "train.global_batch_size=1")  # fmt: skip
JOBS = {
    "lora": ("mistral-7b-samsum-lora.yaml", "mistralai/Mistral-7B-Instruct-v0.2", ("train.gradient_checkpointing=false",), None),
    "qlora": ("gemma-2b-dialogsum-qlora.yaml", "google/gemma-2b", ("train.optimizer=adamw_torch", "train.gradient_checkpointing=true"), None),
    # P6: the same wide two-layer Mistral trained with LoRA on bf16 weights and with QLoRA on 4-bit ones
    "wide-lora": ("mistral-7b-samsum-lora.yaml", "mistralai/Mistral-7B-Instruct-v0.2", ("train.gradient_checkpointing=true",), WIDE),
    "wide-qlora": ("mistral-7b-samsum-lora.yaml", "mistralai/Mistral-7B-Instruct-v0.2",
                   ("train.gradient_checkpointing=true", "method.name=qlora", "method.bits=4"), WIDE),
    # every other seed family, its job's method as written
    "falcon-qlora": ("falcon-7b-samsum-qlora.yaml", "tiiuae/falcon-7b", (), None),
    "t5-lora": ("flan-t5-base-dialogsum-lora.yaml", "google/flan-t5-base", ("eval.bertscore.model=null",), None),
    "t5-full": ("flan-t5-base-dialogsum-full.yaml", "google/flan-t5-base", (), None),
    "distilbert-lora": ("distilbert-imdb-lora.yaml", "distilbert-base-uncased", (), None),
}  # fmt: skip
SEED_FAMILIES = ["lora", "qlora", "falcon-qlora", "t5-lora", "t5-full", "distilbert-lora"]
STEPS = 3


def seed_job(kind: str, model_dir: Path, gpu: bool, steps: int = STEPS, extra: tuple[str, ...] = ()):
    from dsum import config

    name, _, overrides, shape = JOBS[kind]
    fixed = [
        f"model.name={model_dir}",
        "train.epochs=null",
        f"train.max_steps={steps}",
        "train.warmup_steps=0",
        "train.warmup_ratio=0",
        "train.logging_steps=1",
        "tracking.enabled=false",
    ]
    if not gpu:
        fixed += CPU_OVERRIDES
        if shape is WIDE:
            fixed += P6_CPU
    return config.load(ROOT / "jobs" / name, [*overrides, *fixed, *extra])


def build_model(
    kind: str, out: Path, gpu: bool, layers: int | None = None, shape: dict | None = None, dtype=None
) -> Path:
    """A seed model's architecture with random weights and a tokenizer, saved as a local checkpoint: the real
    shapes on a GPU, scaled-down ones on the CPU, or the given `shape` (config fields)."""
    import torch
    import transformers

    from dsum import model as models
    from dsum.architectures import ARCHITECTURES, TASKS, known_config, share_embeddings
    from dsum.config import ModelConfig, TinyModelConfig

    hub = JOBS[kind][1]
    model_type = ARCHITECTURES[hub][0]
    cfg = known_config(hub)
    shape = shape if shape is not None else JOBS[kind][3]
    scaled = shape if shape is not None else (SCALED if not gpu else {})
    for key, value in scaled.items():
        if key in ARCHITECTURES[hub][1] or key in ("num_key_value_heads", "head_dim") and key in vars(cfg):
            setattr(cfg, key, value)
    if layers:
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layers"):
            if hasattr(cfg, key):
                setattr(cfg, key, layers)
    tokenizer = models.load_tokenizer(
        ModelConfig(name="tiny-llama"), str(models.preset_dir("tiny-llama", TinyModelConfig()))
    )  # any tokenizer: the batches are random ids
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )  # fmt: skip
    if TASKS[model_type] == "seq2seq":
        cfg.decoder_start_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    # the checkpoint's own dtype on a GPU (bf16 for the decoders, fp32 for FLAN-T5 and DistilBERT)
    dtype = dtype or (getattr(torch, str(cfg.dtype).removeprefix("torch.")) if gpu else torch.float32)
    auto = getattr(transformers, models.AUTO_CLASSES[TASKS[model_type]])
    with torch.device("cuda" if gpu else "cpu"):
        net = auto.from_config(cfg, dtype=dtype)
    share_embeddings(net)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def full_length_data(job, rows: int):
    """Rows as long as the job allows, random tokens, every one a label."""
    import datasets
    import torch

    from dsum.train import PreparedData

    g = torch.Generator().manual_seed(0)
    source, target = job.data.max_source_length, job.data.max_target_length
    task = job.model.task
    length = source + target if task == "causal" else source
    ids = torch.randint(5, 1000, (rows, length), generator=g).tolist()
    if task == "seq2seq":
        labels = torch.randint(5, 1000, (rows, target), generator=g).tolist()
    elif task == "classification":
        labels = torch.randint(0, job.model.num_labels, (rows,), generator=g).tolist()
    else:
        labels = ids
    table = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": labels})
    held_out = table.select(range(min(rows, job.eval.batch_size)))
    return PreparedData(datasets.DatasetDict(train=table, validation=held_out), {}, {})


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(kinds: list[str], gpu: bool, layers: int | None, queue) -> None:
    """In a fresh process, for each kind: build the model, plan the job, train it a few steps, and report
    both peaks (the kernel's high-water mark of the resident set is reset before each, /proc/self/clear_refs)."""
    import peft  # noqa: F401  (imported before the baseline: what training adds is measured, not imports)
    import torch
    import transformers.trainer  # noqa: F401

    from dsum import memory, plan, train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not gpu:
        torch.set_num_threads(1)
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="dsum-seed-") as tmp:
            model_dir = build_model(kind, Path(tmp) / "model", gpu, layers)
            job = seed_job(kind, model_dir, gpu)
            planned = plan.plan(job, memory=True)["memory"]
            prepared = full_length_data(job, rows=job.train.micro_batch_size * STEPS)
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set
                before = _rss()
            start = time.perf_counter()
            _, result = train.fit(job, Path(tmp) / "out", prepared)
            elapsed = time.perf_counter() - start
            if gpu:
                peak = torch.cuda.max_memory_allocated() - before
                estimate = planned["training_gib"]["total"] - planned["training_gib"].get("runtime", 0)
            else:
                peak = _rss("VmHWM") - before
                estimate = planned["training_gib"]["total"]
        queue.put(
            {
                "kind": kind,
                "job": JOBS[kind][0],
                "device": torch.cuda.get_device_name() if gpu else "cpu (scaled-down shapes)",
                "measured_peak_gib": round(peak / memory.GiB, 3),
                "planned_peak_gib": round(estimate, 3),
                "planned_over_measured": round(estimate * memory.GiB / peak, 3),
                "tokens_per_s": round(result.train_tokens_per_s or 0, 1),
                "steps": result.global_step,
                "seconds": round(elapsed, 1),
                "planned_parts_gib": planned["training_gib"],
                "assumptions": planned["assumptions"],
            }
        )


def run(kinds: list[str], gpu: bool, layers: int | None = None) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(kinds, gpu, layers, queue))
    # glibc keeps freed blocks below its (growing) mmap threshold for reuse: fixed at 64 KiB, freed tensors go
    # back to the OS and the resident set follows the live tensors, as the GPU's allocated peak does
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_") if saved is None else os.environ.update(MALLOC_MMAP_THRESHOLD_=saved)
    results = []  # read before join: a full queue would keep the child from exiting
    while len(results) < len(kinds):
        try:
            results.append(queue.get(timeout=5))
        except Empty:
            if not proc.is_alive():  # it died without a result (killed, out of memory): say so, don't wait
                break
    proc.join()
    if proc.exitcode != 0 or len(results) < len(kinds):
        raise RuntimeError(f"the seed measurements failed (exit {proc.exitcode})")
    return results

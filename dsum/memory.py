"""Per-device memory of a job, planned before anything loads (`dsum plan`).

Weights, adapters, gradients and optimizer states are counted parameter by parameter on the model built on
the meta device, at the precision each one has in training: 4-bit or 8-bit bitsandbytes blocks with their
scales; the fp32 copies of the other weights that k-bit preparation makes; fp32 LoRA adapters; AdamW's two
states, 8-bit ones (bitsandbytes' blocks, 32-bit below 4096 elements) or Adafactor's factored ones; ZeRO-2
and -3 partitions of them (and of the weights, for ZeRO-3) across the workers, with DeepSpeed's fp32 master
copy under mixed precision.

Activations are not estimated from formulas: the model runs one forward pass on fake tensors (shapes and
dtypes only, no memory, no data) at the job's longest example, and every tensor autograd saves for the
backward pass is summed, once per storage; so attention's implementation, grouped-query heads, LoRA's
dropout copies and the loss's fp32 logits count as they are. Gradient checkpointing keeps each layer's input,
and one layer's activations while the backward pass recomputes it. The backward pass starts with the
gradients of the loss's logits (fp32). On a GPU a fixed runtime reserve (CUDA context, cuBLAS workspaces) is added.

Evaluation generates with a static KV cache: weights, the cache for the evaluation batch at the longest
prompt plus max_new_tokens, and the last position's logits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from dsum.config import MIXED_PRECISION_DTYPES, JobConfig

GiB = 2**30
GPU_RUNTIME = int(0.5 * GiB)  # CUDA context and cuBLAS workspaces, outside PyTorch's allocator
BNB_BLOCK = 64  # bitsandbytes' 4-bit quantization block
ADAM8_MIN_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep 32-bit states below this many elements
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
STRATEGY_COST = {"ddp": 1.0, "deepspeed-zero2": 1.05, "deepspeed-zero3": 1.25}  # relative step time (heuristic)
CHECKPOINTING_COST = 4 / 3  # a second forward pass per layer


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, name) if name and name != "auto" else torch.float32


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def load_dtype(job: JobConfig, skeleton) -> torch.dtype:
    """The dtype the base weights load in: the job's model.dtype, else the checkpoint's own."""
    if job.model.dtype != "auto":
        return _dtype(job.model.dtype)
    return _dtype(getattr(skeleton.config, "dtype", None))


def compute_dtype(job: JobConfig, skeleton) -> torch.dtype:
    """The dtype of the activations: the mixed precision's, else 4-bit's compute dtype, else the weights'."""
    if job.train.precision != "fp32":
        return getattr(torch, MIXED_PRECISION_DTYPES[job.train.precision])
    if job.method.bits == 4:
        return _dtype(job.method.compute_dtype)
    return load_dtype(job, skeleton)


# ------------------------------------------------------------------------------------------- states


def _quantized_bytes(weight: torch.Tensor, bits: int, double_quant: bool) -> float:
    n = weight.numel()
    if bits == 8:  # LLM.int8: int8 weights and an fp32 scale per output row
        return n + 4 * weight.shape[0]
    # bitsandbytes' QuantState, per layer: an absmax per block of 64 (fp32, or with double quant uint8 with an
    # fp32 absmax per 256 blocks and a 256-entry fp32 code of its own), and the 16-entry fp32 nf4/fp4 code
    blocks = math.ceil(n / BNB_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales + 16 * 4


def _optimizer_bytes(optimizer: str, p: torch.Tensor, dtype: torch.dtype) -> float:
    n = p.numel()
    if optimizer == "sgd":  # HF's sgd: no momentum
        return 0
    if optimizer == "adafactor":  # factored second moment (rows + columns), no first moment
        return 4 * (p.shape[0] + n // p.shape[0]) if p.dim() >= 2 else 4 * n
    if optimizer in ("adamw_8bit", "paged_adamw_8bit") and n >= ADAM8_MIN_SIZE:
        return 2 * n + 2 * 4 * math.ceil(n / 256)  # two uint8 states with an fp32 absmax per 256-block
    state = 4 if optimizer == "paged_adamw_32bit" else _size(dtype)
    return 2 * state * n


def states(job: JobConfig, skeleton, quantized: Collection[int] = ()) -> dict[str, float]:
    """Bytes of weights (frozen and trainable), gradients and optimizer states on one device, before any
    ZeRO partitioning; plus the largest layer's weights (what ZeRO-3 gathers at a time). `quantized`: the
    ids of the weights a k-bit load quantizes (dsum.plan.quantized_weights, taken before peft wraps them)."""
    m, t = job.method, job.train
    loaded = load_dtype(job, skeleton)
    quantizable = set(quantized) if m.bits else set()
    out = dict.fromkeys(("weights", "adapters", "gradients", "optimizer"), 0.0)
    quantized = plain = trainable = 0.0  # bytes of k-bit weights; elements of the other frozen and trainable ones
    for p in skeleton.parameters():
        if not p.requires_grad:
            if id(p) in quantizable:
                quantized += _quantized_bytes(p, m.bits, m.double_quant)
            else:
                plain += p.numel()
            continue
        # peft keeps adapters in fp32 whatever the base's dtype; a full fine-tune trains the loaded weights
        dtype = torch.float32 if m.name != "full" else loaded
        trainable += p.numel()
        out["gradients"] += p.numel() * _size(dtype)
        out["optimizer"] += _optimizer_bytes(t.optimizer, p, dtype)
    buffers = sum(b.numel() * b.element_size() for b in skeleton.buffers())  # position ids, rotary frequencies
    # k-bit preparation casts the weights it did not quantize to fp32
    out["weights"] = quantized + plain * (4 if m.bits else _size(loaded)) + buffers
    if m.name == "full":
        out["weights"] += out["gradients"]
    else:
        out["adapters"] = out["gradients"]
    out["eval_weights"] = (
        quantized + plain * _size(loaded) + buffers + out["adapters"] + (out["gradients"] if m.name == "full" else 0)
    )
    out["weights_16bit"] = quantized + (plain + trainable) * 2  # DeepSpeed's bf16/fp16 module
    out["trainable"] = trainable
    # what ZeRO-3 gathers at a time: a block's weights as they are stored (4-bit ones packed, with their scales)
    out["largest_layer"] = max(
        (
            sum(
                _quantized_bytes(p, m.bits, m.double_quant) if id(p) in quantizable else p.numel() * _size(loaded)
                for p in layer.parameters()
            )
            for layer in _layers(skeleton)
        ),
        default=0,
    )
    return out


def weight_bytes(model) -> int:
    """Bytes a loaded model's weights take: every parameter and buffer as stored, and for 4-bit ones their
    quantization state (absmax, nested absmax, code)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = getattr(state, "state2", None)
    return total


def _layers(skeleton) -> list[nn.Module]:
    """The repeated blocks (what gradient checkpointing wraps)."""
    lists = {name: m for name, m in skeleton.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1}
    outer = [m for name, m in lists.items() if not any(name.startswith(other + ".") for other in lists)]
    return [layer for block in outer for layer in block if any(True for _ in layer.parameters())]


# -------------------------------------------------------------------------------------------- activations


def sequence_shape(job: JobConfig) -> dict[str, int]:
    """The longest example the job trains on: prompt budget plus summary budget (causal), encoder and
    decoder lengths (seq2seq), or the text (classification)."""
    d = job.data
    if job.model.task == "causal":
        return {"tokens": d.max_source_length + d.max_target_length}
    if job.model.task == "seq2seq":
        return {"source": d.max_source_length, "target": d.max_target_length}
    return {"tokens": d.max_source_length}


def activations(job: JobConfig, skeleton) -> dict[str, float]:
    """Bytes per example at the longest sequence: what autograd saves without checkpointing, what it saves
    with it (layer inputs and what lies outside the layers), the largest layer's own saved activations (what
    a checkpointed layer recomputes), and the output logits' bytes (their gradient arrives in fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    dtype = compute_dtype(job, skeleton)
    mode = FakeTensorMode()
    with mode:
        params = {
            name: torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype).requires_grad_(
                p.requires_grad
            )
            for name, p in skeleton.named_parameters()
        }
        buffers = {name: torch.empty(b.shape, dtype=b.dtype) for name, b in skeleton.named_buffers()}
    weights = {p.untyped_storage()._cdata for p in params.values()}
    layers = _layers(skeleton)
    index = {id(layer): i for i, layer in enumerate(layers)}
    current: list[int | None] = [None]
    inputs_bytes: dict[int, int] = {}

    def enter(module, args, kwargs):
        current[0] = index[id(module)]
        hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        inputs_bytes[current[0]] = hidden.numel() * hidden.element_size()

    hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    hooks += [layer.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)) for layer in layers]
    saved: dict[int, tuple[int, int | None]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), current[0])
        return tensor

    shape = sequence_shape(job)
    was_training = skeleton.training
    skeleton.train()
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = _fake_batch(job, shape)
            out = functional_call(skeleton, params | buffers, (), inputs)
            logits = out["logits"]
    finally:
        for h in hooks:
            h.remove()
        skeleton.train(was_training)
    per_layer: dict[int, float] = {}
    outside = 0.0
    for nbytes, layer in saved.values():
        if layer is None:
            outside += nbytes
        else:
            per_layer[layer] = per_layer.get(layer, 0) + nbytes
    return {
        "saved": outside + sum(per_layer.values()),
        "saved_checkpointed": outside + sum(inputs_bytes.values()),
        "largest_layer": max(per_layer.values(), default=0.0),
        "logits": logits.numel() * logits.element_size(),
        "logits_grad": logits.numel() * 4,
    }


def _fake_batch(job: JobConfig, shape: dict[str, int]) -> dict[str, torch.Tensor]:
    if job.model.task == "seq2seq":
        return {
            "input_ids": torch.zeros(1, shape["source"], dtype=torch.long),
            "attention_mask": torch.ones(1, shape["source"], dtype=torch.long),
            "decoder_input_ids": torch.zeros(1, shape["target"], dtype=torch.long),
            "labels": torch.zeros(1, shape["target"], dtype=torch.long),
        }
    ids = torch.zeros(1, shape["tokens"], dtype=torch.long)
    if job.model.task == "classification":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(1, dtype=torch.long)}
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def _text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _hidden_size(cfg) -> int:
    cfg = _text_config(cfg)
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"no hidden size in {type(cfg).__name__}")


# ------------------------------------------------------------------------------------------- combining


def training_peak(
    job: JobConfig,
    st: dict[str, float],
    act: dict[str, float],
    *,
    micro_batch: int,
    checkpointing: bool,
    strategy: str,
    workers: int,
    gpu: bool,
) -> dict[str, float]:
    """Bytes on one device at the peak of a step (the start of the backward pass), by part."""
    n = max(1, workers)
    zero = strategy.removeprefix("deepspeed-zero") if strategy.startswith("deepspeed-") else None
    parts = {"weights": st["weights"], "adapters": st["adapters"]}
    if zero is None:
        parts["gradients"] = st["gradients"] * (2 if n > 1 else 1)  # DDP's buckets hold a second copy
        parts["optimizer"] = st["optimizer"]
    else:
        # DeepSpeed trains 16-bit weights under mixed precision and keeps an fp32 master copy with the optimizer
        mixed = job.train.precision != "fp32"
        if mixed:  # 16-bit weights and gradients; an fp32 master copy of the trainable ones beside the optimizer
            parts["weights"], parts["adapters"] = st["weights_16bit"], 0.0
            parts["gradients"] = st["trainable"] * 2 / n
            parts["optimizer"] = (st["optimizer"] + st["trainable"] * 4) / n
        else:
            parts["gradients"] = st["gradients"] / n
            parts["optimizer"] = st["optimizer"] / n
        if zero == "3":
            parts["weights"] = parts["weights"] / n + 2 * st["largest_layer"]  # a gathered layer and the next
            parts["adapters"] = parts["adapters"] / n
    saved = act["saved_checkpointed"] if checkpointing else act["saved"]
    parts["activations"] = micro_batch * saved
    # The backward pass starts at the loss: the fp32 gradient of its log-softmax and of the logits (and a copy
    # in the logits' dtype); a checkpointed layer's recomputed activations come later, once those are freed.
    transient = 2 * act["logits_grad"] + (act["logits"] if act["logits"] != act["logits_grad"] else 0)
    if checkpointing:
        transient = max(transient, act["largest_layer"])
    parts["backward_transient"] = micro_batch * transient
    if gpu:
        parts["runtime"] = GPU_RUNTIME
    parts["total"] = sum(parts.values())
    return parts


def evaluation_peak(job: JobConfig, skeleton, st: dict[str, float], gpu: bool) -> dict[str, float]:
    """Bytes while the evaluation generates: the trained model's weights, a static KV cache for the evaluation
    batch at the longest prompt plus max_new_tokens, and one position's logits per row."""
    parts = {"weights": st["eval_weights"]}
    if job.model.task == "classification":
        parts["kv_cache"] = 0.0
    else:
        cfg = _text_config(skeleton.config)
        dtype = compute_dtype(job, skeleton) if job.method.bits else load_dtype(job, skeleton)
        b, src, new = job.eval.batch_size, job.data.max_source_length, job.eval.max_new_tokens
        per_token = _kv_per_token(cfg) * _size(dtype)
        # decoder-only: the prompt and the new tokens; encoder-decoder: cross-attention over the prompt, self-attention
        # over the new tokens
        parts["kv_cache"] = b * per_token * (src + new)
        parts["logits"] = b * getattr(cfg, "vocab_size", 0) * 4
    if gpu:
        parts["runtime"] = GPU_RUNTIME
    parts["total"] = sum(parts.values())
    return parts


def _kv_per_token(cfg) -> int:
    """Elements of keys and values per token over the (decoder) layers."""
    layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "num_hidden_layers", None) or cfg.num_layers
    heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or _hidden_size(cfg) // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None)
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv_heads = 1
    return 2 * layers * (kv_heads or heads) * head_dim


# --------------------------------------------------------------------------------------------- planning


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '40' (GiB) → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GiB, 80GB)")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    if int(value * scale) < 2**20:
        raise ValueError(f"{text!r} is less than 1 MiB: give the memory of one GPU (e.g. 24GiB, 80GB)")
    return int(value * scale)


def format_size(n: float) -> str:
    """Bytes for a reader: GiB with a decimal from 1 GiB up, else MiB (a tiny plan needs megabytes)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{max(n, 0) / 2**20:.0f} MiB"


def plan_memory(
    job: JobConfig, skeleton, gpu_memory: int | None = None, quantized: Collection[int] = ()
) -> dict[str, Any]:
    """The memory section of `dsum plan`: training and evaluation peaks per device in GiB, by part, at the
    job's settings; with gpu_memory, the fastest micro batch, checkpointing and strategy that fit."""
    gpu = job.scaling.use_gpu
    st = states(job, skeleton, quantized)
    act = activations(job, skeleton)
    t, s = job.train, job.scaling

    def peak(micro_batch, checkpointing, strategy, workers=s.num_workers):
        return training_peak(
            job, st, act, micro_batch=micro_batch, checkpointing=checkpointing, strategy=strategy,
            workers=workers, gpu=gpu,
        )  # fmt: skip

    train = peak(t.micro_batch_size, t.gradient_checkpointing, s.strategy)
    evaluation = evaluation_peak(job, skeleton, st, gpu)
    out: dict[str, Any] = {
        "device": "GPU" if gpu else "CPU (process memory)",
        "assumptions": {
            "sequence": sequence_shape(job),
            "micro_batch": t.micro_batch_size,
            "gradient_checkpointing": t.gradient_checkpointing,
            "strategy": s.strategy,
            "workers": s.num_workers,
            "weights_dtype": str(load_dtype(job, skeleton)).removeprefix("torch."),
            "activations_dtype": str(compute_dtype(job, skeleton)).removeprefix("torch."),
            "optimizer": t.optimizer,
            "runtime_reserve_gib": round(GPU_RUNTIME / GiB, 2) if gpu else 0,
        },
        "training_gib": _gib(train),
        "evaluation_gib": _gib(evaluation),
        "peak_gib": round(max(train["total"], evaluation["total"]) / GiB, 2),
    }
    if job.eval.workers:  # each evaluation worker holds what one evaluating process holds; the driver no model
        where = "one GPU each" if gpu else "process memory each, on the nodes Ray places them on"
        out["evaluation_workers"] = {
            "workers": job.eval.workers,
            "each_gib": round(evaluation["total"] / GiB, 3),
            "together_gib": round(job.eval.workers * evaluation["total"] / GiB, 3),
            "where": where,
        }
    if gpu_memory is not None:
        out["gpu_memory_gib"] = round(gpu_memory / GiB, 2)
        out["gpu_memory"] = format_size(gpu_memory)
        out["recommendation"] = recommend(job, peak, evaluation["total"], gpu_memory)
    return out


def recommend(job: JobConfig, peak, evaluation: float, budget: int) -> dict[str, Any]:
    """Among micro batches that keep the job's global batch (accumulation makes up the rest), with and without
    gradient checkpointing, and DDP or ZeRO (with more than one worker), the setting of highest estimated
    throughput whose training peak fits in 95% of the memory: throughput grows with the micro batch up to 8
    sequences, checkpointing costs a third more compute, ZeRO some communication."""
    t, s = job.train, job.scaling
    per_worker = job.batches.per_worker  # the recommendation keeps it; accumulation makes up the rest
    strategies = ["ddp"]
    if s.num_workers > 1 or s.strategy != "ddp":
        strategies += ["deepspeed-zero2"] + ([] if job.method.bits == 8 else ["deepspeed-zero3"])
    limit = 0.95 * budget
    best = None
    for strategy in strategies:
        for checkpointing in (False, True):
            for micro in MICRO_BATCHES:
                if per_worker % micro:
                    continue
                total = peak(micro, checkpointing, strategy)["total"]
                if total > limit:
                    continue
                speed = min(micro, 8) / STRATEGY_COST[strategy] / (CHECKPOINTING_COST if checkpointing else 1)
                key = (speed, -total)
                if best is None or key > best[0]:
                    best = (key, micro, checkpointing, strategy, total)
    if best is None:
        return {"fits": False, "reason": _why_not(job, peak, strategies, limit), "evaluation_fits": evaluation <= limit}
    _, micro, checkpointing, strategy, total = best
    overrides = [f"train.micro_batch_size={micro}", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    if strategy != s.strategy:
        overrides.append(f"scaling.strategy={strategy}")
    if not t.global_batch_size and micro != t.micro_batch_size:
        overrides.append(f"train.global_batch_size={per_worker * s.num_workers}")
    return {
        "fits": True,
        "micro_batch_size": micro,
        "gradient_accumulation": per_worker // micro,
        "gradient_checkpointing": checkpointing,
        "strategy": strategy,
        "training_gib": round(total / GiB, 3),
        "evaluation_fits": evaluation <= limit,
        "overrides": " ".join(overrides),
    }


def _why_not(job: JobConfig, peak, strategies: list[str], limit: float) -> str:
    """Why nothing fits: the smallest setting's need and its largest parts; then what would fit: ZeRO-3 over
    more workers (it shards the weights too), else 4-bit weights."""
    strategy = min(strategies, key=lambda st: peak(1, True, st)["total"])
    parts = peak(1, True, strategy)
    largest = sorted((k for k in parts if k != "total"), key=lambda k: -parts[k])[:3]
    reason = (
        f"needs {format_size(parts['total'])} at micro batch 1 with checkpointing and {strategy} "
        f"({', '.join(f'{k} {format_size(parts[k])}' for k in largest)})"
    )
    if not job.method.bits:
        reason += "; try method.name=qlora method.bits=4"
    if job.method.bits != 8:
        for workers in range(job.scaling.num_workers + 1, 65):
            need = peak(1, True, "deepspeed-zero3", workers)["total"]
            if need <= limit:
                return f"{reason}; deepspeed-zero3 over {workers} workers would fit ({format_size(need)} each)"
    return reason


def _gib(parts: dict[str, float]) -> dict[str, float]:
    return {k: round(v / GiB, 3) for k, v in parts.items()}

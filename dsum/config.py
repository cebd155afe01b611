"""The job config: one typed, nested, frozen description of a run, loaded from YAML plus `a.b=c` overrides.

Every field carries its documentation (shown by `dsum train --help`). Unknown keys, wrong types and
contradictions between fields are `ConfigError`s that name the file and the dotted path; they are all
found by `load`, before anything starts. This module imports only dsum.errors.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from dsum.batches import Batches
from dsum.errors import ConfigError

TINY_PRESETS = {"tiny-llama": "causal", "tiny-t5": "seq2seq", "tiny-bert": "classification"}
"""Offline models built from config; their names stand where a hub id would."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TinyModelConfig(_Part):
    hidden_size: int = Field(64, gt=0, description="Width of the tiny preset model.")
    num_layers: int = Field(2, gt=0, description="Layers of the tiny preset (each stack, for tiny-t5).")
    num_heads: int = Field(4, gt=0, description="Attention heads of the tiny preset.")
    intermediate_size: int = Field(256, gt=0, description="MLP width of the tiny preset.")
    vocab_size: int = Field(2048, ge=256, description="Size of the BPE vocabulary trained offline on the bundled data.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(_Part):
    name: str = Field(
        "tiny-llama",
        description="Hub id (e.g. mistralai/Mistral-7B-Instruct-v0.2), a local model directory, "
        f"or an offline preset: {', '.join(TINY_PRESETS)}.",
    )
    task: Literal["causal", "seq2seq", "classification"] = Field(
        "causal", description="Model head: causal decoder, encoder-decoder, or sequence classifier."
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) to pin.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repository.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype at load time ('auto': the checkpoint's own)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; flash_attention_2 needs a GPU."
    )
    num_labels: int = Field(2, ge=2, description="Classes, for task=classification.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of a tiny preset.")

    @model_validator(mode="after")
    def _preset_task(self):
        want = TINY_PRESETS.get(self.name)
        if want and want != self.task:
            raise ValueError(f"preset {self.name} is a {want} model; set model.task={want}")
        return self

    @property
    def is_preset(self) -> bool:
        return self.name in TINY_PRESETS


class ColumnsConfig(_Part):
    dialogue: str = Field("dialogue", description="Column holding the dialogue (or text, for classification).")
    summary: str | list[str] = Field(
        "summary",
        description="Column holding the summary (label, for classification); a list names several "
        "reference columns (the first is trained on, all are used by evaluation).",
    )


class SplitsConfig(_Part):
    train: str = Field("train", description="Name of the training split in the source.")
    validation: str = Field("validation", description="Name of the validation split in the source.")
    test: str = Field("test", description="Name of the test split in the source.")


class DataConfig(_Part):
    source: str = Field(
        "bundled",
        description="'bundled' (dialogues shipped with dsum), 'bundled-reviews' (sentiment sample), a hub "
        "dataset name (samsum, knkarthick/dialogsum, imdb), or a local .jsonl/.json/.csv/.parquet file.",
    )
    revision: str | None = Field(None, description="Hub dataset revision to pin.")
    files: dict[str, str] | None = Field(
        None, description="Local files per split, e.g. {train: a.jsonl, test: b.jsonl}; overrides source."
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Column map.")
    splits: SplitsConfig = Field(default_factory=SplitsConfig, description="Split names in the source.")
    split_ratio: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/validation/test fractions when the source has one split."
    )
    seed: int = Field(42, description="Seed of the deterministic split.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training rows (after splitting).")
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on validation/test rows.")
    instruction: str = Field("Summarize the following dialogue.", description="Instruction put before the dialogue.")
    prompt_template: str | None = Field(
        None,
        description="Prompt with {instruction} and {dialogue} placeholders; default: the tokenizer's chat "
        "template for causal models that have one, else a built-in instruction template.",
    )
    use_chat_template: bool = Field(True, description="Use the tokenizer's chat template when it has one.")
    max_source_length: int = Field(512, gt=0, description="Token budget of the prompt; the dialogue is trimmed to fit.")
    max_target_length: int = Field(128, gt=0, description="Token budget of the summary; longer rows are bad rows.")
    packing: bool = Field(
        False,
        description="Pack each training batch into one padding-free row; position ids restart per example, "
        "so examples do not attend to each other (decoder-only models).",
    )
    strict: bool = Field(False, description="Stop at the first bad row instead of counting and skipping it.")

    @model_validator(mode="after")
    def _checks(self):
        if abs(sum(self.split_ratio) - 1.0) > 1e-6 or min(self.split_ratio) < 0:
            raise ValueError(f"split_ratio {list(self.split_ratio)} must be non-negative and sum to 1")
        if self.prompt_template is not None and "{dialogue}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the {dialogue} placeholder")
        return self


class MethodConfig(_Part):
    name: Literal["lora", "qlora", "full"] = Field(
        "lora", description="LoRA adapter, QLoRA (4-bit base + LoRA), or full fine-tune."
    )
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' to find every linear layer but the head."
    )
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full next to the adapter.")
    bits: Literal[4, 8] | None = Field(None, description="Load the base in 4 or 8 bits (bitsandbytes); qlora needs 4.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of 4-bit matmuls.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype the 4-bit weights are packed in ('auto': uint8; under deepspeed-zero3 the model's "
        "dtype, which ZeRO-3 needs to shard them with the other weights).",
    )

    @model_validator(mode="after")
    def _checks(self):
        if self.name == "qlora" and self.bits != 4:
            raise ValueError("qlora needs a 4-bit base: set method.bits=4")
        if self.name == "full" and self.bits is not None:
            raise ValueError("full fine-tuning cannot train quantized weights: drop method.bits or use lora/qlora")
        return self


class TrainConfig(_Part):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; exactly one of max_steps/epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training split.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warmup as a fraction of all steps (not with warmup_steps)."
    )
    micro_batch_size: int = Field(4, gt=0, description="Examples per worker per forward pass.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Examples per optimizer step over all workers (default: micro batch × workers); "
        "gradient accumulation makes up the difference.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"] = (
        Field("adamw_torch", description="Optimizer (8-bit and paged ones from bitsandbytes).")
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0: off).")
    sampler: Literal["random", "group_by_length", "batch_rebalance"] = Field(
        "batch_rebalance",
        description="Training batch order. batch_rebalance: the examples of each optimizer step are drawn at "
        "random, as with random, then split into micro-batches of equal padded-token cost across workers and "
        "accumulation steps (sizes vary, so no worker waits at the all-reduce for a longer batch); random; "
        "group_by_length (similar lengths in a batch, least padding, batches no longer random).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision; fp16 needs a GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Validation loss every N steps (default: at the end; in a sweep, 4 times a trial)."
    )
    eval_rouge_samples: int | None = Field(
        None,
        gt=0,
        description="At each evaluation also generate summaries for the first N validation rows and report "
        "their ROUGE-L (eval_rougeL); summarization tasks only.",
    )
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (default: at the end).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept in the run directory.")
    output_dir: str = Field("runs", description="Parent of run directories.")
    run_name: str | None = Field(None, description="Run directory name (default: job name + time).")
    resume_from: str | None = Field(
        None,
        description="A Trainer checkpoint directory to start from. A run run again under the same run_name "
        "resumes from its latest checkpoint in the storage path without it ('latest' says so).",
    )

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or ".." in v):
            raise ValueError(
                f"{v!r} is not a plain name: letters, digits, '.', '_' and '-', starting with a letter or digit "
                "(a run directory sits inside train.output_dir)"
            )
        return v

    @model_validator(mode="after")
    def _checks(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps and epochs")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                f"can't set both warmup_steps ({self.warmup_steps}) and warmup_ratio ({self.warmup_ratio}); "
                "set the other one to 0"
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """The warmup's optimizer steps in a run of `total_steps`, as transformers' TrainingArguments.get_warmup_steps
        counts them (a ratio rounds up)."""
        return math.ceil(total_steps * self.warmup_ratio) if self.warmup_ratio else self.warmup_steps

    @property
    def resume_path(self) -> Path | None:
        """The checkpoint directory resume_from names; None for none or 'latest' (the storage path's own)."""
        return None if self.resume_from in (None, "latest") else Path(self.resume_from)


class ScalingConfig(_Part):
    num_workers: int = Field(1, gt=0, description="Training workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker; DDP over NCCL instead of gloo.")
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs reserved per worker (a CPU worker computes on as many threads). auto: on a Ray that "
        "`dsum train` starts on this machine, its CPUs divided among the workers; on a cluster it joins, and for "
        "a sweep's trials, 1.",
    )
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    strategy: Literal["ddp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "ddp", description="Data parallelism: DDP or DeepSpeed ZeRO stage 2/3."
    )
    storage_path: str | None = Field(
        None, description="Shared storage for checkpoints (local dir, s3://, gs://); default: train.output_dir."
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts before the run fails (-1: unlimited).")

    @field_validator("cpus_per_worker", mode="before")
    @classmethod
    def _cpus(cls, v):
        return _cpus_or_auto(v)

    def worker_cpus(self, machine_cpus: float | None = None) -> float:
        """CPUs per worker. An explicit value is kept as it is. auto divides `machine_cpus` (those of a Ray
        this run has to itself) among the workers, whole CPUs, at least 1 each; without them (a cluster that
        others may share, a sweep whose trials share the machine) it is 1, Ray Train's own default. The
        driver holds none back: while the workers train it waits, and it evaluates after they have ended."""
        return share_cpus(self.cpus_per_worker, self.num_workers, machine_cpus)


def _cpus_or_auto(v):
    if v == "auto":
        return v
    try:
        cpus = float(v)
    except (TypeError, ValueError):
        cpus = None
    if isinstance(v, bool) or cpus is None or not cpus > 0 or math.isinf(cpus):
        raise ValueError(f"a number of CPUs greater than 0, or auto (got {v!r})")
    return cpus


def share_cpus(cpus_per_worker: float | str, workers: int, machine_cpus: float | None) -> float:
    """A cpus_per_worker setting as a number: kept if it is one; auto: `machine_cpus` divided among the
    workers, whole CPUs, at least 1 each, or 1 without them."""
    if cpus_per_worker != "auto":
        return float(cpus_per_worker)
    return float(max(1, int(machine_cpus // workers))) if machine_cpus else 1.0


class JudgeConfig(_Part):
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. http://host:8000/v1 (default: DSUM_JUDGE_BASE_URL; unset: no judge).",
    )
    model: str = Field("gpt-4o-mini", description="Judge model name at the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's API key.")
    local_model: str | None = Field(None, description="A local HF causal model (dir or hub id) to judge with instead.")
    max_examples: int | None = Field(50, gt=0, description="Examples judged (judging costs a call each).")
    max_retries: int = Field(3, ge=0, description="Retries per example on errors or malformed answers.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled at each further one.")

    @model_validator(mode="after")
    def _checks(self):
        if self.base_url and self.local_model:
            raise ValueError("set judge.base_url or judge.local_model, not both")
        return self


class BertScoreConfig(_Part):
    model: str | None = Field(
        None,
        description="Local encoder directory for BERTScore (e.g. an offline all-MiniLM-L6-v2); unset: skipped.",
    )
    layer: int | None = Field(
        None, gt=0, description="Encoder layer whose token embeddings are matched (default: the encoder's last)."
    )
    batch_size: int = Field(32, gt=0, description="Pairs embedded at once.")


class EvalConfig(_Part):
    split: Literal["validation", "test"] = Field("test", description="Split scored after training.")
    max_samples: int | None = Field(None, gt=0, description="Cap on scored examples.")
    sample_seed: int | None = Field(
        None,
        description="With max_samples: score a random choice of that many examples, drawn with this seed (the "
        "same seed, the same examples); unset: the first max_samples.",
    )
    batch_size: int = Field(16, gt=0, description="Generation batch size.")
    max_new_tokens: int = Field(64, gt=0, description="Generated tokens per summary.")
    num_beams: int = Field(1, gt=0, description="Beam search width (1: greedy or sampling).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    compare_base: bool = Field(True, description="Also score the base model on the same examples.")
    workers: int = Field(
        0,
        ge=0,
        description="Ray workers that generate the predictions (a Ray Data actor pool over the cluster, each "
        "loading the models once; one GPU each with scaling.use_gpu); 0: in the driver's process.",
    )
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs per evaluation worker (a CPU worker generates on as many threads). auto: on a Ray that "
        "dsum starts on this machine, its CPUs divided among eval.workers; on a cluster it joins, 1.",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="Resamples of the paired bootstrap CI on base-vs-tuned differences."
    )
    similarity_model: str | None = Field(
        None,
        description="Local sentence-encoder directory for semantic similarity (e.g. an offline MiniLM); unset: skipped.",
    )
    bertscore: BertScoreConfig = Field(
        default_factory=lambda: BertScoreConfig(), description="BERTScore of summaries against the references."
    )
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(), description="LLM judge of summaries.")

    @field_validator("cpus_per_worker", mode="before")
    @classmethod
    def _cpus(cls, v):
        return _cpus_or_auto(v)

    @model_validator(mode="after")
    def _checks(self):
        if self.do_sample and self.num_beams > 1:
            raise ValueError("choose sampling (do_sample) or beam search (num_beams > 1), not both")
        return self


SEARCH_KINDS = ("choice", "uniform", "loguniform", "randint")
TUNE_METRICS = {"eval_loss": "min", "eval_rougeL": "max"}
"""What a trial reports at every train.eval_steps, and which way is better."""


def default_space() -> dict[str, dict[str, Any]]:
    return {"method.r": {"choice": [4, 8, 16, 32]}, "train.learning_rate": {"loguniform": [1e-4, 3e-3]}}


class TuneConfig(_Part):
    num_samples: int = Field(4, gt=0, description="Trials to run.")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=default_space,
        description="Search space: dotted job key → {choice: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} "
        "| {randint: [lo, hi)}.",
    )
    alpha_ratio: float | None = Field(
        2.0, gt=0, description="With method.r searched and method.alpha not: alpha = alpha_ratio × r (null: fixed)."
    )
    search: Literal["random", "optuna"] = Field("random", description="Search algorithm: random, or Optuna TPE.")
    seed: int = Field(0, description="Seed of the search.")
    metric: Literal["eval_loss", "eval_rougeL"] = Field(
        "eval_loss",
        description="Reported every train.eval_steps: validation loss, or ROUGE-L of generated summaries "
        "(needs train.eval_rouge_samples).",
    )
    scheduler: Literal["asha", "asha-promote", "none"] = Field(
        "asha-promote",
        description="Early stopping: asha-promote (ASHA with promotions: a trial at a rung pauses until it is in "
        "the top 1/reduction_factor of the rung's results, or no other trial can reach the rung; a promoted trial "
        "resumes from its checkpoint), asha (Ray's: a trial at a rung goes on while in the top 1/reduction_factor "
        "of the results so far, else stops), or none (every trial runs out).",
    )
    grace_period: int = Field(
        1, gt=0, description="ASHA: evaluations (of train.eval_steps) a trial runs before it may be stopped."
    )
    reduction_factor: float = Field(2, gt=1, description="ASHA: 1/reduction_factor of trials go on at each rung.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials at once (default: as many as the cluster's CPUs/GPUs hold)."
    )
    trial_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A trial whose workers report no metric (a logged step or an evaluation) for this many seconds, "
        "from the start of their train function (data, model, first steps) or their last report (a hang in loading, a "
        "deadlock), is stopped and marked failed; the sweep goes on with the others (null: no limit).",
    )

    @property
    def mode(self) -> str:
        return TUNE_METRICS[self.metric]

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each key is a field of the job; each domain draws values of that field's type (a choice's values
        come out as the field holds them: '4' for an integer field is 4)."""
        if not space:
            raise ValueError("space: nothing to search")
        return {key: _check_domain(key, spec, check_search_key(key)) for key, spec in space.items()}


def check_search_key(key: str) -> Any:
    """A dotted key of the job schema that holds a value (not a section, not the tune section itself); returns
    the type of the value."""
    model: type[BaseModel] | None = JobConfig
    parts = key.split(".")
    annotation: Any = None
    for i, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields or (i == 0 and part == "tune"):
            raise ValueError(f"{key}: {_unknown(parts, i, [f for f in fields if f != 'tune'])}")
        annotation = fields[part].annotation
        model = _section(annotation)
    if model is not None:
        raise ValueError(f"{key}: is a section; search one of its fields")
    return annotation


def _check_domain(key: str, spec: Any, annotation: Any) -> dict[str, Any]:
    """The domain, checked against the field's type (its range rules, e.g. > 0, are sweep.check's: it builds
    the jobs)."""
    where = key
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise ValueError(f"{where}: one of {{{', '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    takes = TypeAdapter(annotation)
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{where}: choice needs a non-empty list, got {arg!r}")
        values = []
        for value in arg:
            try:
                values.append(takes.dump_python(takes.validate_python(value), mode="json"))
            except ValidationError as e:
                raise ValueError(
                    f"{where}: choice {value!r}: {_type_message(e)} ({key} takes {_kind_of(annotation)})"
                ) from None
        return {kind: values}
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in arg)
    ):
        raise ValueError(f"{where}: {kind} needs [low, high], got {arg!r}")
    low, high = arg
    if kind == "randint" and not all(isinstance(x, int) for x in arg):
        raise ValueError(f"{where}: randint needs integer bounds, got {arg!r}")
    draws = 1 if kind == "randint" else 0.5  # what the kind draws: whole numbers, or fractional ones
    try:
        takes.validate_python(draws, strict=True)
    except ValidationError:
        drawn = "integers" if kind == "randint" else "fractional numbers"
        fits = "use choice" if kind == "randint" or not _takes_ints(takes) else "use randint or choice"
        raise ValueError(f"{where}: {kind} draws {drawn} and {key} takes {_kind_of(annotation)}: {fits}") from None
    if low >= high:
        raise ValueError(f"{where}: empty range [{low}, {high}]: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform bounds must be > 0, got [{low}, {high}]")
    return {kind: [low, high]}


def _takes_ints(takes: TypeAdapter) -> bool:
    try:
        takes.validate_python(1, strict=True)
        return True
    except ValidationError:
        return False


def _kind_of(annotation: Any) -> str:
    """A field's type in words, for messages."""
    union = get_origin(annotation) is not Literal and get_args(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
    words = []
    for a in args:
        if get_origin(a) is Literal:
            words.append("one of " + ", ".join(repr(v) for v in get_args(a)))
        else:
            words.append({int: "integers", float: "numbers", bool: "true or false", str: "text"}.get(a, str(a)))
    return " or ".join(words)


def _type_message(e: ValidationError) -> str:
    return e.errors()[0]["msg"].removeprefix("Value error, ")


class TrackingConfig(_Part):
    enabled: bool = Field(True, description="Track the run in MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow server or store (default: MLFLOW_TRACKING_URI, else a local sqlite file)."
    )
    experiment: str = Field("dsum", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None, description="Register the run's model under this name (the first version that passes becomes champion)."
    )
    first_champion: bool = Field(
        True,
        description="With no champion yet, a version that beats its base model by the promotion rule "
        "(promote_margin, promote_min_ci_low) becomes champion; false: every version waits for dsum promote "
        "(scheduled sweeps register so).",
    )
    retries: int = Field(3, ge=0, description="Retries of each request to a tracking server before giving up.")
    timeout_s: int = Field(10, gt=0, description="Seconds before a request to the tracking server times out.")
    promote_margin: float = Field(
        0.005,
        ge=0,
        description="ROUGE-L (accuracy for classifiers) gain needed over the champion (dsum promote), "
        "or over the base model for a first champion.",
    )
    promote_min_ci_low: float = Field(
        0.0, description="The 95% CI of that gain must lie above this (paired bootstrap)."
    )


MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # train.precision → the 16-bit dtype


class JobConfig(_Part):
    name: str = Field("job", description="Job name (default: the YAML file's stem).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and prompting.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=100), description="Optimization.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers and resources.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after training.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter search.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking.")

    @model_validator(mode="after")
    def _checks(self):
        # Each rule names the fields to change; the messages become "file: path: message".
        self.batches  # noqa: B018 (a global batch the micro batches don't divide raises, naming the fields)
        if self.scaling.strategy == "deepspeed-zero3" and self.method.bits == 8:
            raise ValueError(
                "method.bits: 8-bit bases can't be sharded by scaling.strategy=deepspeed-zero3; use method.bits=4 "
                "or deepspeed-zero2"
            )
        if self.scaling.strategy == "deepspeed-zero3" and self.method.bits == 4:
            self._check_zero3_storage()
        if self.data.packing and self.model.task != "causal":
            raise ValueError(f"data.packing is for decoder-only models, not model.task={self.model.task}")
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision=fp16 needs scaling.use_gpu=true; use bf16 or fp32 on CPU")
        if self.eval.bertscore.model and self.model.task == "classification":
            raise ValueError("eval.bertscore: BERTScore is for summaries, not model.task=classification")
        if self.train.eval_rouge_samples and self.model.task == "classification":
            raise ValueError("train.eval_rouge_samples: ROUGE is for summaries, not model.task=classification")
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            raise ValueError("model.attn_implementation=flash_attention_2 needs scaling.use_gpu=true")
        return self

    @property
    def batches(self) -> Batches:
        """Micro batch, workers and gradient accumulation (dsum.batches: all batch and step arithmetic)."""
        return Batches.of(self.train.micro_batch_size, self.scaling.num_workers, self.train.global_batch_size)

    def optimizer_steps(self, train_rows: int) -> int:
        """The optimizer steps a run of this job takes over `train_rows` examples: train.max_steps, or the steps
        of train.epochs (dsum.batches, as the Trainer counts them; packing can only make them fewer)."""
        b = self.batches
        return b.optimizer_steps(self.train.max_steps, self.train.epochs, b.micro_batches(train_rows))

    @property
    def quant_storage(self) -> str:
        """The dtype 4-bit weights are packed in: method.quant_storage, or for 'auto' uint8 (bitsandbytes'
        default) and under ZeRO-3 a float dtype, which the whole model then loads in, as PEFT's ZeRO-3 QLoRA
        guide sets it: ZeRO-3 flattens and shards every weight, 4-bit ones included, and under mixed precision
        DeepSpeed casts every float weight to the 16-bit dtype (deepspeed 0.19 runtime/engine.py,
        _cast_module_mixed_precision), so packed 4-bit data survive only if already in it. 'auto' is that
        16-bit dtype, else model.dtype, else float32."""
        if self.method.quant_storage != "auto":
            return self.method.quant_storage
        if self.scaling.strategy != "deepspeed-zero3":
            return "uint8"
        if self.train.precision in MIXED_PRECISION_DTYPES:
            return MIXED_PRECISION_DTYPES[self.train.precision]
        return self.model.dtype if self.model.dtype != "auto" else "float32"

    def _check_zero3_storage(self) -> None:
        storage = self.quant_storage
        if storage == "uint8":
            raise ValueError(
                "method.quant_storage: deepspeed-zero3 shards float weights only; use the model's dtype (auto does)"
            )
        mixed = MIXED_PRECISION_DTYPES.get(self.train.precision)
        if mixed and storage != mixed:
            raise ValueError(
                f"method.quant_storage: {storage} under train.precision={self.train.precision} with deepspeed-zero3 "
                f"would be cast to {mixed} by DeepSpeed, 4-bit data included; use {mixed} (auto does)"
            )
        if self.model.dtype not in ("auto", storage):
            raise ValueError(
                f"model.dtype ({self.model.dtype}) must equal the 4-bit storage ({storage}) under deepspeed-zero3: "
                "ZeRO-3 shards the 4-bit weights with the others, in one dtype"
            )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- loading


# libyaml's parser where PyYAML was built with it (the pip wheels are): the same safe types, ten times faster
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML, apply `a.b=c` overrides (typed by the field) and validate everything."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a job file (e.g. {path / 'tiny-dialogsum.yaml'})") from None
    except OSError as e:
        raise ConfigError(f"{path}: can't read the job file: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job is a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for item in overrides:
        _apply_override(raw, item, path)
    return from_dict(raw, source=str(path))


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section (a model) a field holds; None for a value."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown(parts: list[str], i: int, fields) -> str:
    """parts[i] is no field of its section: say so, with the closest field as the dotted key meant."""
    hint = difflib.get_close_matches(parts[i], fields, n=1)
    return "unknown key" + (f" (did you mean {'.'.join(parts[:i] + hint)}?)" if hint else "")


def _apply_override(raw: dict, item: str, path: Path) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{path}: override {item!r} is not of the form a.b=value")
    parts = key.split(".")
    # Check the path against the schema first, so a typo is named instead of silently added.
    model: type[BaseModel] | None = JobConfig
    for i, part in enumerate(parts):
        if model is None:
            break
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(f"{path}: override {'.'.join(parts[: i + 1])}: {_unknown(parts, i, fields)}")
        ann = fields[part].annotation
        if get_origin(ann) is dict and i + 2 < len(parts):  # a mapping keyed by dotted names: tune.space.a.b
            parts = [*parts[: i + 1], ".".join(parts[i + 1 :])]
            break
        model = _section(ann)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(_key(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent_path, key = err["loc"][:-1], str(err["loc"][-1])
        model: type[BaseModel] = JobConfig
        for p in parent_path:
            ann = model.model_fields[str(p)].annotation if isinstance(p, str) and p in model.model_fields else None
            model = _section(ann) or model
        return f"{loc}: {_unknown([key], 0, model.model_fields)}"
    if loc and err["type"] == "value_error" and re.match(r"[\w.]+: ", msg):  # a section's check names its field
        return f"{loc}.{msg}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"].startswith("value_error") else f" (got {got!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _key(part: Any) -> str:
    """A key as an error names it: quoted when it would not read as one (blank, or with a line break in it)."""
    text = str(part)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, type and default, description) of every leaf field, for `--help`."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            if (section := _section(f.annotation)) is not None:
                walk(section, f"{prefix}{name}.")
                continue
            default = f.default if f.default_factory is None else f.default_factory()
            rows.append((f"{prefix}{name}", f"{default!r}", f.description or ""))

    walk(JobConfig, "")
    return rows

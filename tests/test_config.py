"""Job configs: every shipped job validates; bad configs fail at load time with one line naming the path."""

import json
import re
import socket
import time

import pytest
from conftest import JOBS, dsum, dsum_here

from dsum import config

ALL_JOBS = sorted(JOBS.glob("*.yaml"))


def test_jobs_exist():
    names = {p.stem for p in ALL_JOBS}
    assert {
        "tiny-dialogsum",
        "mistral-7b-samsum-lora",
        "flan-t5-base-dialogsum-lora",
        "flan-t5-base-dialogsum-full",
        "gemma-2b-dialogsum-qlora",
        "falcon-7b-samsum-qlora",
        "distilbert-imdb-lora",
    } <= names


@pytest.mark.parametrize("job", ALL_JOBS, ids=lambda p: p.stem)
def test_every_job_validates_through_cli(job):
    proc = dsum("validate", job, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["valid"] and out["config"]["name"] == job.stem


@pytest.mark.parametrize("job", ALL_JOBS, ids=lambda p: p.stem)
def test_every_job_opens_with_its_command(job):
    head = job.read_text().splitlines()[:6]
    assert head[0].startswith("# ")
    assert any(f"dsum train jobs/{job.name}" in line for line in head)


def test_override_is_typed_by_field():
    job = config.load(
        JOBS / "tiny-dialogsum.yaml", ["train.learning_rate=1e-3", "train.max_steps=70", "data.packing=true"]
    )
    assert job.train.learning_rate == 1e-3 and isinstance(job.train.learning_rate, float)
    assert job.train.max_steps == 70 and job.data.packing is True


def test_config_is_frozen():
    job = config.load(JOBS / "tiny-dialogsum.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        job.train.max_steps = 3


def test_grad_accumulation_from_global_batch():
    job = config.load(
        JOBS / "tiny-dialogsum.yaml",
        ["train.global_batch_size=32", "train.micro_batch_size=4", "scaling.num_workers=2"],
    )
    assert job.batches.accumulation == 4


def test_warmup_is_counted_as_transformers_counts_it(tmp_path):
    """TrainConfig.warmup_for (bench's bare loop) against transformers' own TrainingArguments.get_warmup_steps,
    given what dsum's Trainer gets (train.py: warmup_ratio or warmup_steps; a float below 1 is a ratio)."""
    from transformers import TrainingArguments

    job = JOBS / "tiny-dialogsum.yaml"
    for overrides in ([], ["train.warmup_ratio=0.07"], ["train.warmup_ratio=0", "train.warmup_steps=20"],
                      ["train.warmup_ratio=0"]):  # fmt: skip
        t = config.load(job, overrides).train
        args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=t.warmup_ratio or t.warmup_steps, report_to=[])
        for total in (10, 120, 500, 333):
            assert t.warmup_for(total) == args.get_warmup_steps(total), (overrides, total)


def test_field_docs_show_in_help():
    proc = dsum("train", "--help")
    assert proc.returncode == 0
    assert "method.target_modules" in proc.stdout and "LoRA rank." in proc.stdout


BAD_CONFIGS = [
    # (yaml text, overrides, expected fragment of the error line)
    ("trian: {max_steps: 3}\n", [], "trian: unknown key (did you mean train?)"),
    ("train: {max_steps: 3, lr: 0.1}\n", [], "train.lr: unknown key"),
    ("train: {max_steps: 3, learning_rate: fast}\n", [], "train.learning_rate: Input should be a valid number"),
    ("train: {max_steps: 3}\n", ["train.max_steps=abc"], "train.max_steps: Input should be a valid integer"),
    (
        "train: {max_steps: 3}\n",
        ["train.lerning_rate=1"],
        "override train.lerning_rate: unknown key (did you mean train.learning_rate?)",
    ),
    ("train: {max_steps: 3}\nmethod: {name: qlora}\n", [], "method: qlora needs a 4-bit base"),
    (
        "train: {max_steps: 3, micro_batch_size: 4, global_batch_size: 6}\n",
        [],
        "train.global_batch_size (6) must be divisible",
    ),
    ("train: {max_steps: 10, warmup_steps: 10}\n", [], "warmup_steps (10) must be below max_steps (10)"),
    ("train: {max_steps: 10, epochs: 1}\n", [], "train: set exactly one of max_steps and epochs"),
    ("model: {name: tiny-t5}\ntrain: {max_steps: 3}\n", [], "model: preset tiny-t5 is a seq2seq model"),
    ("data: {split_ratio: [0.5, 0.5, 0.5]}\ntrain: {max_steps: 3}\n", [], "data: split_ratio"),
    ("train: {max_steps: 3, precision: fp16}\n", [], "train.precision=fp16 needs scaling.use_gpu=true"),
    (
        "model: {name: tiny-bert, task: classification}\ntrain: {max_steps: 3, eval_rouge_samples: 8}\n",
        [],
        "train.eval_rouge_samples: ROUGE is for summaries, not model.task=classification",
    ),
    ("train: {max_steps: 3}\n", ["train.max_steps"], "override 'train.max_steps' is not of the form a.b=value"),
    ("train: {max_steps: 3\n", [], "not valid YAML"),
    (
        "data: {prompt_template: 'Summarize this'}\ntrain: {max_steps: 3}\n",
        [],
        "prompt_template must contain the {dialogue} placeholder",
    ),
    ("method: {name: full, bits: 4}\ntrain: {max_steps: 3}\n", [], "full fine-tuning cannot train quantized weights"),
    ("- a\n- b\n", [], "a job is a mapping of sections"),
    (
        "model: {tiny: {hidden_size: 65}}\ntrain: {max_steps: 3}\n",
        [],
        "model.tiny: hidden_size (65) must be divisible by num_heads (4)",
    ),
    ('model: {"a\\nb": 1}\ntrain: {max_steps: 3}\n', [], "model.'a\\nb': unknown key"),  # (found by hypothesis)
    (
        "train: {max_steps: 3}\n",
        ["scaling.cpus_per_worker=many"],
        "scaling.cpus_per_worker: a number of CPUs greater than 0, or auto (got 'many')",
    ),
]


@pytest.mark.parametrize("text,overrides,fragment", BAD_CONFIGS, ids=[c[2][:40] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_file_and_path(tmp_path, text, overrides, fragment):
    job = tmp_path / "bad.yaml"
    job.write_text(text)
    proc = dsum("validate", job, *overrides)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dsum: error: {job}: ")
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_job_file(tmp_path):
    proc = dsum("validate", tmp_path / "nope.yaml")
    assert proc.returncode == 2 and proc.stderr.strip() == f"dsum: error: {tmp_path / 'nope.yaml'}: no such job file"


def test_an_address_where_no_ray_answers_fails_at_once(tmp_path):
    """Ray would retry a dead address for minutes; dsum says so in one line, before anything is written."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    for command in ("train", "tune"):
        proc = dsum_here(
            command, JOBS / "tiny-dialogsum.yaml", "train.eval_steps=10", "--address", f"127.0.0.1:{port}", cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert errors == [
            f"dsum: error: {JOBS / 'tiny-dialogsum.yaml'}: --address 127.0.0.1:{port}: no Ray cluster answers there "
            "(Connection refused); start one (ray start --head) or fix the address"
        ]
    assert time.monotonic() - start < 60 and not (tmp_path / "runs").exists()


def test_qlora_under_zero3_packs_its_4_bits_in_the_dtype_deepspeed_keeps():
    zero3 = ["method.name=qlora", "method.bits=4", "scaling.num_workers=2", "scaling.strategy=deepspeed-zero3"]
    load = lambda *extra: config.load(JOBS / "tiny-dialogsum.yaml", [*zero3, *extra])  # noqa: E731
    assert config.load(JOBS / "tiny-dialogsum.yaml", zero3[:2]).quant_storage == "uint8"  # DDP: bitsandbytes' own
    assert load().quant_storage == "float32"  # fp32 on CPU: the dtype the model loads in
    assert load("train.precision=bf16").quant_storage == "bfloat16"  # what DeepSpeed casts every float weight to
    assert load("model.dtype=bfloat16", "train.precision=bf16").quant_storage == "bfloat16"
    for extra, message in [
        (["method.quant_storage=uint8"], "method.quant_storage: deepspeed-zero3 shards float weights only"),
        (["method.quant_storage=float32", "train.precision=bf16"], "would be cast to bfloat16 by DeepSpeed"),
        (["model.dtype=float16", "method.quant_storage=float32"], "model.dtype (float16) must equal the 4-bit storage"),
        (["method.name=lora", "method.bits=8"], "method.bits: 8-bit bases can't be sharded"),
    ]:
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            load(*extra)


@pytest.mark.parametrize(
    "value, workers, machine, cpus",
    [("auto", 1, 2, 2), ("auto", 2, 2, 1), ("auto", 3, 8, 2), ("auto", 4, 2, 1), ("auto", 1, None, 1),
     (0.5, 1, 8, 0.5), (3, 2, 2, 3)],
)  # fmt: skip
def test_cpus_per_worker_auto_divides_the_machine_and_an_explicit_value_stays(value, workers, machine, cpus):
    """auto: the CPUs of a Ray the run has to itself, whole ones, divided among its workers, at least 1 each; 1
    without them (a cluster it joins, a sweep's trials: launch.resolve_cpus). A number is kept as it is."""
    job = config.load(
        JOBS / "tiny-dialogsum.yaml", [f"scaling.cpus_per_worker={value}", f"scaling.num_workers={workers}"]
    )
    assert job.scaling.worker_cpus(machine) == cpus
    assert config.load(JOBS / "tiny-dialogsum.yaml").scaling.cpus_per_worker == "auto"  # the default

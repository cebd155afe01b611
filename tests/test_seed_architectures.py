"""Every seed job on its own architecture. Each model family of jobs/ (Mistral, Falcon, Gemma, FLAN-T5,
DistilBERT) is built from dsum/architectures.py at tiny width (random weights, dsum's offline tokenizer,
saved as a local checkpoint: architectures.build_tiny, conftest.seed_model), and the seed job itself runs
through the CLI on the session's cluster with `model.name=<that checkpoint>`, the bundled data and two steps.
(The Mistral job runs as a rendered Kubernetes RayJob, through KubeRay's submitter line:
tests/test_k8s_operator.py, with these overrides and checks.)

The job's method stays as written: LoRA on q,k,v,o (Mistral), QLoRA nf4 + double quant + paged 8-bit AdamW
with bf16 compute (Falcon on every dense layer, Gemma on q..down), LoRA r=32 on q,v and full fine-tuning
(FLAN-T5), LoRA classification (DistilBERT); so do its precision and dtypes. What changes is what this
machine needs: no GPU, short sequences, two steps, a small evaluation, no tracking. Each run finishes,
evaluates, and saves weights that load again; a QLoRA run's targeted layers are all 4-bit, each with its
LoRA adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import JOBS, MINILM, dsum_here

from dsum import config, rundir
from dsum import model as models

pytestmark = pytest.mark.e2e

# seed job → (its hub model, data overrides for the bundled sets)
SEEDS = {
    "mistral-7b-samsum-lora": ("mistralai/Mistral-7B-Instruct-v0.2", ["data.source=bundled"]),
    "falcon-7b-samsum-qlora": ("tiiuae/falcon-7b", ["data.source=bundled"]),
    "gemma-2b-dialogsum-qlora": ("google/gemma-2b", ["data.source=bundled"]),
    "flan-t5-base-dialogsum-lora": ("google/flan-t5-base", ["data.source=bundled", f"eval.bertscore.model={MINILM}"]),
    "flan-t5-base-dialogsum-full": ("google/flan-t5-base", ["data.source=bundled", "data.splits.validation=validation",
                                                            "data.splits.test=test"]),
    "distilbert-imdb-lora": ("distilbert-base-uncased", ["data.source=bundled-reviews", "data.max_source_length=64"]),
}  # fmt: skip
SMALL = ["scaling.use_gpu=false", "train.epochs=null", "train.max_steps=2", "train.warmup_steps=0",
         "train.warmup_ratio=0", "train.eval_steps=null", "train.save_steps=null", "train.logging_steps=1",
         "train.micro_batch_size=2", "train.global_batch_size=2", "data.max_source_length=96",
         "data.max_target_length=24", "eval.max_samples=2", "eval.compare_base=false", "eval.max_new_tokens=8",
         "eval.batch_size=2", "tracking.enabled=false"]  # fmt: skip


@pytest.fixture(autouse=True)
def _driver(ray_client):
    """This process is the runs' driver on the session's cluster (as conftest.train_here's runs are)."""


def _train(job: str, checkpoint: Path, overrides: list[str], cwd: Path) -> tuple[dict, config.JobConfig]:
    args = [f"model.name={checkpoint}", *SMALL, *overrides, f"train.run_name={job}"]
    proc = dsum_here("train", JOBS / f"{job}.yaml", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cwd / "runs" / job
    return json.loads((run / rundir.RESULTS).read_text()), config.load(run / rundir.CONFIG)


def _reload(job: config.JobConfig, run: Path):
    """The run's weights loaded again as `dsum eval` and `dsum summarize` load them."""
    return models.load_trained(job.model, job.method, str(run / "final"))


def _check_run(result: dict, job: config.JobConfig, run: Path) -> torch.nn.Module:
    assert result["global_step"] == 2 and result["examples"] == 2
    metric = "accuracy" if job.model.task == "classification" else "rougeL"
    assert metric in result["tuned"], result["tuned"]
    return _reload(job, run)


def _adapted(model) -> dict[str, torch.nn.Module]:
    """Modules that hold a LoRA adapter, by name, with the layer it adapts."""
    return {name: module.base_layer for name, module in model.named_modules() if hasattr(module, "lora_A")}


def _assert_qlora(model, targets) -> None:
    """Every dense layer of the blocks is 4-bit (none left in full precision: the head alone stays), and every
    4-bit layer holds a LoRA adapter (the targets cover all of them, as these jobs' do)."""
    import bitsandbytes as bnb

    adapted = _adapted(model)
    four_bit = {n for n, m in model.named_modules() if type(m) is bnb.nn.Linear4bit}  # not peft's wrappers
    full = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in four_bit
            and ".lora_" not in n and not any(head in n for head in models.HEAD_NAMES)]  # fmt: skip
    assert full == [], f"left in full precision: {full}"
    assert four_bit == {f"{n}.base_layer" for n in adapted} and four_bit, (four_bit, sorted(adapted))
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    assert targets == "all-linear" or leaves == set(targets), leaves


def test_falcon_qlora_puts_every_falconlinear_in_4_bits(seed_model, tmp_path):
    """Falcon's dense layers are FalconLinear, which transformers' bitsandbytes integration leaves alone
    (type(m) is nn.Linear): loaded through dsum they are 4-bit, every one with an adapter (all-linear)."""
    job = "falcon-7b-samsum-qlora"
    result, cfg = _train(job, seed_model(SEEDS[job][0]), SEEDS[job][1], tmp_path)
    model = _check_run(result, cfg, tmp_path / "runs" / job)
    _assert_qlora(model, cfg.method.target_modules)
    assert "FalconLinear" not in {type(m).__name__ for m in model.modules()}
    assert len(_adapted(model)) == 4 * 2  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h in 2 blocks
    assert cfg.train.optimizer == "paged_adamw_8bit" and cfg.method.double_quant and cfg.method.quant_type == "nf4"


def test_gemma_qlora_on_its_architecture_over_two_workers(seed_model, tmp_path):
    """Also QLoRA under DDP: two workers, each with the 4-bit base, one micro batch of each step's two."""
    job = "gemma-2b-dialogsum-qlora"
    result, cfg = _train(job, seed_model(SEEDS[job][0]), [*SEEDS[job][1], "scaling.num_workers=2",
                                                           "train.micro_batch_size=1"], tmp_path)  # fmt: skip
    model = _check_run(result, cfg, tmp_path / "runs" / job)
    _assert_qlora(model, cfg.method.target_modules)
    assert len(_adapted(model)) == 7 * 2 and cfg.scaling.num_workers == 2


def test_flan_t5_lora_on_q_and_v(seed_model, tmp_path):
    job = "flan-t5-base-dialogsum-lora"
    result, cfg = _train(job, seed_model(SEEDS[job][0]), SEEDS[job][1], tmp_path)
    model = _check_run(result, cfg, tmp_path / "runs" / job)
    adapted = _adapted(model)
    # q and v of every attention: the encoder's self-attention, the decoder's self- and cross-attention
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q", "v"} and len(adapted) == 2 * (2 + 2 * 2)
    assert {m.lora_A["default"].out_features for m in (model.get_submodule(n) for n in adapted)} == {32}
    assert "bertscore_f1" in result["tuned"]  # the job's semantic score, from a local encoder here


def test_flan_t5_full_fine_tune_saves_every_weight(seed_model, tmp_path):
    job = "flan-t5-base-dialogsum-full"
    checkpoint = seed_model(SEEDS[job][0])
    result, cfg = _train(job, checkpoint, SEEDS[job][1], tmp_path)
    trained = _check_run(result, cfg, tmp_path / "runs" / job)
    base = models.load_base(cfg.model.model_copy(update={"name": str(checkpoint)}), cfg.method)
    assert result["trainable_params"] == result["total_params"] == sum(p.numel() for p in base.parameters())
    # two steps of AdamW move every weight (the embedding the encoder and decoder share included)
    before, after = base.state_dict(), trained.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_distilbert_lora_classification(seed_model, tmp_path):
    job = "distilbert-imdb-lora"
    result, cfg = _train(job, seed_model(SEEDS[job][0]), SEEDS[job][1], tmp_path)
    model = _check_run(result, cfg, tmp_path / "runs" / job)
    assert {name.rsplit(".", 1)[-1] for name in _adapted(model)} == {"q_lin", "v_lin"}
    assert 0 <= result["tuned"]["accuracy"] <= 1 and cfg.model.num_labels == 2

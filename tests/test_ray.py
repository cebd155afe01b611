"""Ray Train on CPU: DeepSpeed ZeRO-2 over 2 workers matches one process at the same global batch,
QLoRA under ZeRO-3 over 2 workers trains what one process trains (its adapter and the head it trains in full),
and checkpoints no frozen base. (2 DDP workers over gloo, the default, train in test_ray_cluster.py; QLoRA
under 2 workers, the Gemma seed job's, in test_seed_architectures.py.) The runs go through the CLI's main() in the test process (conftest.train_here), on
the session's two-node cluster."""

import json

import pytest
from conftest import JOBS
from safetensors.torch import load_file

from dsum import config, train

pytestmark = pytest.mark.ray

SHORT = ["train.warmup_ratio=0", "eval.max_samples=2", "eval.compare_base=false"]


def _losses(run_dir):
    history = json.loads((run_dir / "train_metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_zero2_over_two_workers_matches_one_process_at_the_same_global_batch(tmp_path, train_here):
    # the default sampler, batch_rebalance, splits a step's 8 examples unevenly between the two workers
    common = [*SHORT, "train.max_steps=12", "train.logging_steps=2", "train.global_batch_size=8"]
    one = config.load(JOBS / "tiny-dialogsum.yaml", [*common, "train.micro_batch_size=8"])
    _, reference = train.fit(one, tmp_path / "one")  # one process, the whole batch
    two = train_here(
        JOBS / "tiny-dialogsum.yaml",
        *common,
        "train.run_name=two",
        "train.micro_batch_size=4",
        "scaling.num_workers=2",
        "scaling.strategy=deepspeed-zero2",
        cwd=tmp_path,
    )
    a = [h["loss"] for h in reference.log_history if "loss" in h]
    b = _losses(tmp_path / "runs/two")
    assert len(a) == len(b) == 6 and reference.global_step == two["global_step"] == 12
    # Same examples per step, split over two workers: the curves agree up to float reduction order.
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 0.02 * x, (a, b)
    # the tokens seen, each worker's count summed across them where logged (train._dsum_trainer): the same
    history = json.loads((tmp_path / "runs/two/train_metrics.json").read_text())["log_history"]
    seen = [h["num_input_tokens_seen"] for h in history if "loss" in h]
    assert seen == [h["num_input_tokens_seen"] for h in reference.log_history if "loss" in h], seen
    ckpts = list((tmp_path / "runs/ray/two").glob("checkpoint_*/checkpoint/adapter_model.safetensors"))
    assert ckpts, "the checkpoint lands in the storage path"
    assert (tmp_path / "runs/two/final/adapter_model.safetensors").exists()
    assert not list((tmp_path / "runs/two/final").glob("optimizer.pt"))
    # the cluster's actors so far (dead ones too): the Train runs' controllers and workers, and none of the
    # per-run actors dsum has no use for (launch._trainer_class, launch.build_trainer)
    from ray.util.state import list_actors

    actors = list_actors(limit=10_000, detail=True, raise_on_missing_output=False)
    started = {a.class_name for a in actors}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PreemptionWatcher"}, started
    # Ray Train hands the driver's settings on to each run's controller: it polls the workers for their reports
    # every 0.25 s (launch.build_trainer), not every 2 s (the tests set nothing of their own)
    for a in actors:
        if a.class_name == "TrainController":
            env = json.loads(a.serialized_runtime_env or "{}").get("env_vars", {})
            assert env.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == "0.25", a.serialized_runtime_env


def _resume_only(final):
    """What only resuming needs, left in final/ (DeepSpeed's shards, optimizer, scheduler)."""
    names = ("global_step", "latest", "zero_to_", "optimizer.pt", "scheduler.pt", "rng_state")
    return [p.name for p in final.iterdir() if p.name.startswith(names)]


def _tensors(path):
    """name → tensor of everything in a checkpoint file (nested dicts and lists flattened)."""
    import torch

    if path.suffix == ".safetensors":
        return load_file(path)
    out = {}

    def walk(x, name):
        if torch.is_tensor(x):
            out[name] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{name}[{i}]")

    walk(torch.load(path, map_location="cpu", weights_only=False), "")
    return out


def test_qlora_under_zero3_over_two_workers_trains_what_one_process_trains_and_saves_no_frozen_base(
    seed_model, tmp_path, train_here
):
    """The Gemma seed job's QLoRA (nf4, double quant) with ZeRO-3 over two workers, its 4-bit weights packed in
    the model's float dtype (JobConfig.quant_storage) so that ZeRO-3 shards them with the rest. Compared with
    one process at the same global batch: fp32 and AdamW in both, so that only the sharding differs (8-bit
    AdamW would quantize ZeRO's flat partition in other blocks than one process's tensors)."""
    job = JOBS / "gemma-2b-dialogsum-qlora.yaml"
    common = [f"model.name={seed_model('google/gemma-2b')}", "data.source=bundled", "scaling.use_gpu=false",
              "train.epochs=null", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
              "train.warmup_steps=0", "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.learning_rate=1e-2",
              "train.precision=fp32", "train.optimizer=adamw_torch", "train.global_batch_size=4",
              "method.dropout=0", "method.modules_to_save=[lm_head]", "data.max_source_length=96", "data.max_target_length=24", "eval.max_samples=2",
              "eval.compare_base=false", "eval.max_new_tokens=8", "tracking.enabled=false"]  # fmt: skip
    one = config.load(job, [*common, "train.micro_batch_size=4"])
    _, reference = train.fit(one, tmp_path / "one", final_dir=tmp_path / "one-final")
    result = train_here(job, *common, "train.run_name=z3", "train.micro_batch_size=2", "scaling.num_workers=2",
                        "scaling.strategy=deepspeed-zero3", cwd=tmp_path)  # fmt: skip
    a = [h["loss"] for h in reference.log_history if "loss" in h]
    b = _losses(tmp_path / "runs/z3")
    assert len(a) == len(b) == 6 and all(abs(x - y) <= 1e-4 * x for x, y in zip(a, b, strict=True)), (a, b)
    assert max(b[-2:]) < b[0] - 0.05, f"the loss does not fall: {b}"
    # the evaluation reads the 4-bit weights as one process does (which may use bitsandbytes' repacked CPU
    # kernel, bf16 inside: model.keep_4bit_layout; measured 3e-3 apart with the head trained too)
    assert result["eval_loss"] == pytest.approx(reference.eval_loss, rel=1e-2)

    # final/: the adapter gathered from the two shards, equal to one process's; nothing only resuming needs
    final = tmp_path / "runs/z3/final"
    mine, theirs = (
        load_file(final / "adapter_model.safetensors"),
        load_file(tmp_path / "one-final/adapter_model.safetensors"),
    )
    assert mine.keys() == theirs.keys() and sum(t.numel() for t in mine.values()) == result["trainable_params"]
    # ZeRO-3's shards gathered: every LoRA matrix and the head trained in full beside them, none empty
    assert all(t.numel() for t in mine.values()) and any(".lm_head." in k for k in mine), sorted(mine)
    diff = sum(float((mine[k].float() - theirs[k]).norm() ** 2) for k in mine) ** 0.5
    norm = sum(float(t.norm() ** 2) for t in theirs.values()) ** 0.5
    assert norm > 0 and diff <= 1e-3 * norm, (diff, norm)
    assert _resume_only(final) == []

    # every checkpoint: both ranks' optimizer shards and the adapter, the frozen base not (4-bit weights are
    # kept as their quantization state's few constants, every targeted layer's: they are 4-bit on the workers)
    trainable = result["trainable_params"]
    checkpoints = sorted((tmp_path / "runs/ray/z3").glob("checkpoint_*/checkpoint"))
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        files = [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".safetensors")]
        assert len([p for p in files if p.name.endswith("optim_states.pt")]) == 2, files
        tensors = {f"{p.name}:{k}": t for p in files for k, t in _tensors(p).items()}
        quant_state = {k for k in tensors if ".base_layer.weight." in k}
        held = {k: t.numel() for k, t in tensors.items() if t.numel() and k not in quant_state}
        # adapter + two Adam states and ZeRO's fp32 partition of the trainable weights (+ step counters)
        assert sum(held.values()) <= 4 * trainable + 16, sorted(held.items(), key=lambda kv: -kv[1])[:5]
        layers = {k.split(".base_layer.weight.")[0].split(":module.")[-1] for k in quant_state if "nf4" in k}
        assert len(layers) == 7 * 2, sorted(layers)  # q, k, v, o, gate, up, down in both blocks
        budget = 2 * 16 * trainable + sum(t.numel() * t.element_size() for k, t in tensors.items() if k in quant_state)
        assert sum(p.stat().st_size for p in files) <= budget, (sum(p.stat().st_size for p in files), budget)

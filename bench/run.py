"""dsum benchmarks: each figure is a ratio measured within one run, printed as one JSON line:

    {"figure": "P4", "value": 12.3, "goal": 5, "detail": {...}}

    python bench/run.py                 # every figure
    python bench/run.py --only P4       # some of them

P1  training tokens/s through dsum with 1 Ray worker ÷ a bare torch + peft loop (same model, data, batch,
    optimizer, schedule, threads), tiny default job.
P3  training tokens/s with 2 Ray workers ÷ 1 Ray worker, one thread each (DDP over gloo).
P4  batched generation (sliced prefill into a static KV cache, one decode for the batch) vs one dialogue at a
    time (dialogues/s), tiny model, same dialogues.
P5  training steps of an 8-trial `dsum tune` sweep with ASHA ÷ those of the same 8 configurations (same
    seeded search) each run to the end; and whether both sweeps pick the same best configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models only; no hub lookups


TRAIN_STEPS = 120


def _job(*overrides: str):
    from dsum import config

    fixed = [f"train.max_steps={TRAIN_STEPS}", "train.logging_steps=20", "eval.compare_base=false"]
    return config.load(ROOT / "jobs" / "tiny-dialogsum.yaml", [*fixed, *overrides])


def _dsum_train(workdir: Path, name: str, *overrides: str) -> dict:
    """Train through dsum's launcher (preflight, Ray Train workers, checkpoints); the worker-measured
    tokens/s covers the whole training loop, checkpoint saving and reporting to Ray included."""
    from dsum import plan, rundir
    from dsum.dist import launch

    job = _job(f"train.output_dir={workdir}", f"train.run_name={name}", *overrides)
    run = rundir.create(job, fresh=True)
    prepared = plan.preflight(job, run)
    return launch.train(job, run, prepared, "jobs/tiny-dialogsum.yaml", fresh=True).as_dict()


def _bare_loop(threads: int) -> dict:
    """What a hand-written script does: torch + peft, the same data, batch, AdamW, schedule and clipping."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_scheduler, set_seed

    from dsum import model, train

    job = _job()
    t = job.train
    torch.set_num_threads(threads)
    set_seed(t.seed)
    tokenizer = model.load_tokenizer(job.model)
    tokenized = train.prepare_data(job, tokenizer).tokenized
    net = model.apply_method(model.load_base(job.model, job.method), job.model.task, job.method, False)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    loader = DataLoader(tokenized["train"], batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=TRAIN_STEPS)
    net.train()
    step, tokens, losses, start = 0, 0, [], time.perf_counter()
    while step < TRAIN_STEPS:
        for batch in loader:
            loss = net(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss))
            step += 1
            if step == TRAIN_STEPS:
                break
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "mean_loss": sum(losses) / len(losses)}


def p1_ray_overhead(workdir: Path) -> dict:
    bare = _bare_loop(threads=1)
    ours = _dsum_train(workdir, "p1", "scaling.num_workers=1", "scaling.cpus_per_worker=1")
    value = ours["train_tokens_per_s"] / bare["tokens_per_s"]
    return {
        "figure": "P1",
        "value": round(value, 3),
        "goal": 0.97,
        "detail": {
            "steps": TRAIN_STEPS,
            "dsum_1_worker_tokens_per_s": round(ours["train_tokens_per_s"], 1),
            "bare_loop_tokens_per_s": round(bare["tokens_per_s"], 1),
            "dsum_train_loss": round(ours["train_loss"], 4),
            "bare_train_loss": round(bare["mean_loss"], 4),
            "threads": 1,
            "model": "tiny-llama LoRA (jobs/tiny-dialogsum.yaml)",
        },
    }


def p3_two_workers(workdir: Path) -> dict:
    one = _dsum_train(workdir, "p3-one", "scaling.num_workers=1", "scaling.cpus_per_worker=1")
    two = _dsum_train(workdir, "p3-two", "scaling.num_workers=2", "scaling.cpus_per_worker=1")
    return {
        "figure": "P3",
        "value": round(two["train_tokens_per_s"] / one["train_tokens_per_s"], 3),
        "goal": 1.7,
        "detail": {
            "steps": TRAIN_STEPS,
            "one_worker_tokens_per_s": round(one["train_tokens_per_s"], 1),
            "two_workers_tokens_per_s": round(two["train_tokens_per_s"], 1),
            "micro_batch_per_worker": 8,
            "threads_per_worker": 1,
            "sampler": _job().train.sampler,
            "backend": "DDP over gloo",
        },
    }


def p4_batched_generation(repeats: int = 3) -> dict:
    """The default job's evaluation (test split, its batch size and max_new_tokens) on its base model,
    batched vs batch size 1. Every dialogue gets exactly max_new_tokens in both ways (min_new_tokens), so
    the work is equal; the best of `repeats` timings of each counts."""
    import torch

    from dsum import config, data, model
    from dsum.eval import generate

    job = config.load(ROOT / "jobs" / "tiny-dialogsum.yaml")
    tokenizer = model.load_tokenizer(job.model)
    base = model.load_base(job.model, job.method)
    dialogues = data.load_splits(job.data, job.model.task)[0][job.eval.split]["dialogue"]
    base.generation_config.min_new_tokens = job.eval.max_new_tokens

    def rate(batch_size: int) -> float:
        cfg = job.eval.model_copy(update={"batch_size": batch_size})
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate.generate(base, tokenizer, dialogues, job.data, cfg, job.model.task)
            best = min(best, time.perf_counter() - start)
        return len(dialogues) / best

    rate(job.eval.batch_size)  # warm-up
    single, batched = rate(1), rate(job.eval.batch_size)
    return {
        "figure": "P4",
        "value": round(batched / single, 2),
        "goal": 5,
        "detail": {
            "dialogues": len(dialogues),
            "batch_size": job.eval.batch_size,
            "new_tokens": job.eval.max_new_tokens,
            "batched_dialogues_per_s": round(batched, 1),
            "single_dialogues_per_s": round(single, 1),
            "model": f"{job.model.name} (jobs/tiny-dialogsum.yaml)",
            "torch_threads": torch.get_num_threads(),
        },
    }


SWEEP_STEPS, SWEEP_EVAL_STEPS, SWEEP_TRIALS = 48, 3, 8


def p5_asha_sweep(workdir: Path) -> dict:
    """Two sweeps of the default job through dsum's own `dsum tune` path (pipeline.run_sweep): the same
    seeded random search over LoRA rank and learning rate, once with ASHA (an evaluation every 3 steps,
    rungs at steps 3, 9 and 27: reduction factor 3, grace period one evaluation) and once with every trial
    run out. Steps are what each trial trained."""
    from dsum import pipeline

    space = "{method.r: {choice: [4, 8, 16, 32]}, train.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}}"

    def sweep(name: str, scheduler: str) -> dict:
        job = _job(
            f"train.max_steps={SWEEP_STEPS}", f"train.eval_steps={SWEEP_EVAL_STEPS}", "train.warmup_steps=0",
            f"train.output_dir={workdir}", f"train.run_name={name}", "tracking.enabled=false",
            f"tune.space={space}", f"tune.num_samples={SWEEP_TRIALS}", "tune.seed=0",
            f"tune.scheduler={scheduler}", "tune.grace_period=1", "tune.reduction_factor=3",
        )  # fmt: skip
        return pipeline.run_sweep(job, "jobs/tiny-dialogsum.yaml", fresh=True)

    asha, full = sweep("p5-asha", "asha"), sweep("p5-full", "none")
    configs = [sorted(tuple(sorted(t["params"].items())) for t in s["trials"]) for s in (asha, full)]
    if configs[0] != configs[1]:
        raise RuntimeError(f"P5: the two sweeps sampled different configurations: {configs}")
    steps = [sum(t["step"] or 0 for t in s["trials"]) for s in (asha, full)]
    same_best = asha["best"]["params"] == full["best"]["params"]
    return {
        "figure": "P5",
        "value": round(steps[0] / steps[1], 3),
        "goal": 0.4,
        "same_best": same_best,
        "detail": {
            "trials": SWEEP_TRIALS,
            "steps_asha": steps[0],
            "steps_full": steps[1],
            "stopped_early": sum(t["stopped_early"] for t in asha["trials"]),
            "best_asha": asha["best"]["params"] | {"eval_loss": round(asha["best"]["eval_loss"], 4)},
            "best_full": full["best"]["params"] | {"eval_loss": round(full["best"]["eval_loss"], 4)},
            "max_steps": SWEEP_STEPS,
            "eval_steps": SWEEP_EVAL_STEPS,
            "scheduler": "ASHA on eval_loss, grace 1 evaluation, reduction factor 3",
            "concurrent_trials": asha["max_concurrent_trials"],
        },
    }


FIGURES = {"P1": p1_ray_overhead, "P3": p3_two_workers, "P4": p4_batched_generation, "P5": p5_asha_sweep}
NEEDS_WORKDIR = {"P1", "P3", "P5"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated figures, e.g. P4")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]}; known: {', '.join(FIGURES)}")
    # Ray forwards its workers' logs to stdout; the figures alone go there.
    figures_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with tempfile.TemporaryDirectory(prefix="dsum-bench-") as workdir:
        for name in names:
            figure = FIGURES[name](Path(workdir)) if name in NEEDS_WORKDIR else FIGURES[name]()
            print(json.dumps(figure), file=figures_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dsum benchmarks: each figure is a ratio measured within one run, printed as one JSON line:

    {"figure": "P4", "value": 12.3, "goal": 5, "detail": {...}}

    python bench/run.py                 # every figure
    python bench/run.py --only P4       # some of them

P1  training tokens/s through dsum with 1 Ray worker ÷ a bare torch + peft loop (same model, data, batch,
    optimizer, schedule, threads), tiny default job.
F1  the training FLOP/s of P1's dsum run ÷ this machine's dense fp32 matmul FLOP/s, one thread (no goal).
P2  share of the computed tokens that are real (not padding), packed vs padded batches of the bundled
    dialogues (the job's own data loader), and the real tokens/s of packed ÷ padded training.
P3  training tokens/s with 2 Ray workers ÷ 1 Ray worker at the same global batch (16: one worker accumulates
    two micro batches of 8) and the same sampler (random), one thread each (DDP over gloo). In its detail: each
    run's step time in parts, and what the machine allows two processes (two bare loops at once ÷ one alone,
    the bare DDP loop ÷ the bare loop alone). Every P3 measurement is taken twice, interleaved; the best of each.
P3-bare  dsum's 2 workers ÷ a bare 2-process torch.distributed DDP loop (the P1 bare loop made distributed),
    with both step-time breakdowns.
P3-padding  the padding saving at 2 workers: real tokens/s with batch_rebalance ÷ with random batches.
P4  batched generation (sliced prefill into a static KV cache, one decode for the batch) vs one dialogue at a
    time (dialogues/s), tiny model, same dialogues.
P5  training steps of an 8-trial `dsum tune` sweep with ASHA's promotions (tune.scheduler: asha-promote) ÷
    those of the same 8 configurations (same seeded search) each run to the end, and whether both sweeps
    pick the same best configuration; Ray's ASHA (tune.scheduler: asha) alongside, in the detail.
P5-wall  the same sweeps' wall-clock (each from its own Ray's start to its outcome): asha-promote's ÷ the full
    sweep's, with each sweep's trial segments (a start, or a resumption after a pause), their start-up and
    their training in the detail.
P6  weight bytes of Mistral-7B's architecture loaded in 4-bit (nf4) ÷ in bf16, measured on its first one and two
    layers at full width (random weights) and taken to its 32 layers; and the peak process memory of a short
    QLoRA run ÷ a LoRA run of the same (wide, two-layer) model.
P7  evaluation dialogues/s with 2 evaluation workers ÷ 1 (eval.workers: a Ray Data pool, one thread each), the
    same rows and settings, and whether both pools predict the same.

    python bench/run.py --gpu           # the seed architectures: dsum plan's estimate vs measured peak memory

--gpu (see bench/seeds.py): with CUDA, every seed family's job (Mistral LoRA, Gemma and Falcon QLoRA, FLAN-T5
LoRA and full, DistilBERT LoRA) on its model at the real shape (random weights) on one GPU; without, the same
code on scaled-down shapes on the CPU (the Mistral and Gemma jobs; --kinds for others). One line per job:
planned ÷ measured peak (goal: within 25%), with tokens/s.
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
sys.path.insert(0, str(ROOT / "bench"))
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
    from dsum.cluster import launch

    job = _job(f"train.output_dir={workdir}", f"train.run_name={name}", *overrides)
    run = rundir.create(job, fresh=True)
    prepared = plan.preflight(job)
    return launch.train(job, run, prepared, "jobs/tiny-dialogsum.yaml", fresh=True).as_dict()


def _bare_setup(wrap=None):
    """What both bare loops build, in the same order from the same seed: the default job's training settings,
    its tokenized training rows, its LoRA model (wrapped by `wrap`, e.g. DistributedDataParallel), the
    collator, AdamW over the trainable weights and the schedule, the model in training mode."""
    import torch
    from transformers import DataCollatorForSeq2Seq, get_scheduler, set_seed

    from dsum import model, train

    job = _job()
    t = job.train
    set_seed(t.seed)
    tokenizer = model.load_tokenizer(job.model)
    rows = train.prepare_data(job, tokenizer).tokenized["train"]
    net = model.apply_method(model.load_base(job.model, job.method), job.model.task, job.method, False)
    net = wrap(net) if wrap is not None else net
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_scheduler(
        t.lr_scheduler, opt, num_warmup_steps=t.warmup_for(TRAIN_STEPS), num_training_steps=TRAIN_STEPS
    )
    net.train()
    return t, rows, net, collate, params, opt, sched


def _bare_loop(threads: int, ready=None) -> dict:
    """What a hand-written script does: torch + peft, the same data, batch, AdamW, schedule and clipping.
    `ready` is called once all is built, before the timed loop."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    t, rows, net, collate, params, opt, sched = _bare_setup()
    loader = DataLoader(rows, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate)
    if ready is not None:
        ready()
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


def _bare_ddp_process(rank: int, world: int, port: int, threads: int, out) -> None:
    """One process of what a hand-written DDP script does: torch.distributed over gloo, DistributedDataParallel,
    a DistributedSampler (random order), and the bare loop's model, data, AdamW, schedule and clipping, at a
    micro batch of 8 per process (global batch 16 with 2). Puts its tokens, time and per-step parts on `out`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = _bare_ddp_steps(rank, world)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def _bare_ddp_steps(rank: int, world: int) -> dict | None:
    """The bare DDP loop in a process of a torch.distributed group (gloo) already set up; rank 0 returns its
    tokens/s (all ranks'), its loss and its steps in parts."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    t, rows, net, collate, params, opt, sched = _bare_setup(DistributedDataParallel)
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=t.seed)
    loader = DataLoader(rows, batch_size=t.micro_batch_size, sampler=sampler, collate_fn=collate)
    parts = dict.fromkeys(("between", "forward", "backward", "optimizer"), 0.0)  # named as dsum's step_ms
    step, epoch, tokens, losses = 0, 0, 0, []
    dist.barrier()
    start = clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[part] += now - clock
        clock = now

    while step < TRAIN_STEPS:
        sampler.set_epoch(epoch)
        for batch in loader:
            lap("between")  # the next batch
            loss = net(**batch).loss
            lap("forward")
            loss.backward()  # DDP all-reduces the gradients in buckets while the backward pass runs
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lap("backward")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            lap("optimizer")
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(loss.detach()))
            step += 1
            if step == 1:  # the first step is set-up (DDP's buckets, the allocator): its parts not counted
                parts = dict.fromkeys(parts, 0.0)
            if step == TRAIN_STEPS:
                break
            clock = time.perf_counter()
        epoch += 1
    elapsed = time.perf_counter() - start
    # the all-reduce alone: the trainable gradients' size, once, as one flat tensor (DDP's buckets add up to it)
    flat = torch.zeros(sum(p.numel() for p in params))
    dist.barrier()
    reduce_start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(flat)
    allreduce_s = (time.perf_counter() - reduce_start) / 20
    totals = torch.tensor([float(tokens), elapsed])
    dist.all_reduce(totals[:1])
    dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
    if rank != 0:
        return None
    ms = {k: round(1000 * v / (TRAIN_STEPS - 1), 2) for k, v in parts.items()}
    return {"tokens_per_s": float(totals[0] / totals[1]), "mean_loss": sum(losses) / len(losses), "step_ms": ms,
            "allreduce_alone_ms": round(1000 * allreduce_s, 2)}  # fmt: skip


def _spawn(target, args: list[tuple], results: int) -> list:
    """Runs target(*a, out) in a fresh process for each a in args (as torchrun would: nothing inherited but the
    environment), and returns the first `results` things they put on `out`."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in args]
    for p in procs:
        p.start()
    got = [out.get(timeout=1800) for _ in range(results)]
    for p in procs:  # (a process may linger after its loop, held by a library's thread: its result is in)
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    return got


def _bare_ddp(workers: int = 2, threads: int = 1) -> dict:
    """The bare loop, made distributed: `workers` processes of _bare_ddp_process."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return _spawn(_bare_ddp_process, [(r, workers, port, threads) for r in range(workers)], results=1)[0]


def _bare_ddp_in_ray_train(workdir: Path, workers: int = 2, threads: int = 1) -> dict:
    """The bare DDP loop as the function of Ray Train workers (a TorchTrainer over gloo, one CPU each, on the
    local Ray dsum starts, with the environment dsum's runs set, launch.build_trainer): Ray's share of the
    way from the bare loop to dsum's."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dsum.cluster import launch

    launch.connect()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # (as launch.build_trainer sets them)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

    out = workdir / f"bare-in-ray-{time.time_ns()}.json"  # (Ray Train V2 keeps metrics only with a checkpoint)

    def loop(config) -> None:
        import torch

        torch.set_num_threads(threads)
        result = _bare_ddp_steps(ray.train.get_context().get_world_rank(), workers)
        if result is not None:
            out.write_text(json.dumps(result))

    TorchTrainer(
        loop,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=out.stem, storage_path=str(workdir)),
    ).fit()
    return json.loads(out.read_text())


def _bare_loop_process(threads: int, start, out) -> None:
    out.put(_bare_loop(threads, ready=start.wait if start is not None else None))


def _bare_alone_and_paired(threads: int = 1) -> tuple[float, float]:
    """What the machine allows two processes: the bare loop's tokens/s alone in a fresh process, and the sum of
    two bare loops (no communication between them) run at once, their timed loops started together."""
    import torch.multiprocessing as mp

    alone = _spawn(_bare_loop_process, [(threads, None)], results=1)[0]["tokens_per_s"]
    start = mp.get_context("spawn").Barrier(2)
    paired = _spawn(_bare_loop_process, [(threads, start)] * 2, results=2)
    return alone, sum(r["tokens_per_s"] for r in paired)


class _CpuUse:
    """Every process's CPU time, read once a second (psutil) while a two-process run trains: `cores()` gives what
    each kind of process used, in cores, over the span in which both training processes computed (each above
    half a core), so what took the machine's two cores from the training is measured, not guessed. Kinds: the
    training processes (Ray Train's workers, or the bare loop's spawned processes), Ray's own (its daemons and
    the Train run's other actors), this driver, the rest of the machine."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _kind(proc) -> str:
        if proc.pid == os.getpid():
            return "driver"
        line = " ".join(proc.info["cmdline"] or ())
        if "RayTrainWorker" in line or ("spawn_main" in line and proc.info["ppid"] == os.getpid()):
            return "training"
        return "ray" if "ray::" in line or "/ray/" in line else "other"

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(1.0):
            now, seen = time.perf_counter(), {}
            for proc in psutil.process_iter(["cmdline", "ppid", "cpu_times"]):
                times = proc.info["cpu_times"]
                if times is not None:
                    seen[proc.pid] = (self._kind(proc), times.user + times.system)
            self.samples.append((now, seen))

    def cores(self, training: int = 2) -> dict:
        def busy(a, b) -> bool:  # every training process above half a core from sample a to sample b
            (t0, s0), (t1, s1) = a, b
            rates = [(s1[p][1] - s0[p][1]) / (t1 - t0) for p in s1 if s1[p][0] == "training" and p in s0]
            return len(rates) == training and min(rates) > 0.5

        spans = [i for i in range(1, len(self.samples)) if busy(self.samples[i - 1], self.samples[i])]
        if not spans:
            return {}
        (t0, first), (t1, last) = self.samples[spans[0] - 1], self.samples[spans[-1]]
        used: dict[str, float] = {}
        for pid, (kind, cpu) in last.items():
            used[kind] = used.get(kind, 0.0) + (cpu - first.get(pid, (kind, 0.0))[1]) / (t1 - t0)
        training_each = [round((last[p][1] - first[p][1]) / (t1 - t0), 3) for p in last
                         if last[p][0] == "training" and p in first]  # fmt: skip
        return {"span_s": round(t1 - t0, 1), "training_each": training_each,
                **{kind: round(used.get(kind, 0.0), 3) for kind in ("training", "ray", "driver", "other")}}  # fmt: skip


def _with_cpu_use(run, *args, **kwargs) -> dict:
    """run(*args, **kwargs)'s result with the CPU use of every kind of process while it trained (`cpu`)."""
    with _CpuUse() as use:
        result = run(*args, **kwargs)
    return {**result, "cpu": use.cores()}


def _matmul_flops(threads: int = 1, n: int = 512, seconds: float = 2.0) -> float:
    """Dense fp32 matmul FLOP/s of this machine at `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def _training_flops_per_token(job) -> float:
    """Forward 2 FLOPs per weight and token; backward 2 more for the activations' gradients through every
    weight, and 2 for the gradients of the trainable ones (attention scores left out: short sequences)."""
    from dsum import plan

    counts = plan.plan(job)
    return 4 * counts["total_params"] + 2 * counts["trainable_params"]


REPEATS = 2


def _tokens_per_s(run) -> float:
    """A measurement's tokens/s: a bare loop's result, a dsum run's TrainResult dict, or the number itself."""
    return run if isinstance(run, float) else run.get("tokens_per_s") or run["train_tokens_per_s"]


def _dsum_train_alone(workdir: Path, name: str, *overrides: str) -> dict:
    """_dsum_train, then Ray shut down: the next measurement runs on an idle machine, as it would alone."""
    import ray

    result = _dsum_train(workdir, name, *overrides)
    ray.shutdown()
    return result


def p1_ray_overhead(workdir: Path) -> list[dict]:
    """The bare loop (in a fresh process) and dsum's one-worker run, each REPEATS times, interleaved, the best of
    each (as P3: this machine's speed drifts within minutes); Ray shut down after each dsum run."""
    bares, runs = [], []
    for rep in range(REPEATS):
        bares.append(_spawn(_bare_loop_process, [(1, None)], results=1)[0])
        runs.append(_dsum_train_alone(workdir, f"p1-{rep}", "scaling.num_workers=1", "scaling.cpus_per_worker=1"))
    bare, ours = max(bares, key=_tokens_per_s), max(runs, key=_tokens_per_s)
    value = ours["train_tokens_per_s"] / bare["tokens_per_s"]
    peak = _matmul_flops(threads=1)
    per_token = _training_flops_per_token(_job())
    achieved = ours["train_tokens_per_s"] * per_token
    flops = {
        "figure": "F1",
        "value": round(achieved / peak, 3),
        "goal": None,
        "detail": {
            "training_gflops": round(achieved / 1e9, 2),
            "matmul_gflops_fp32_512": round(peak / 1e9, 2),
            "flops_per_token": per_token,
            "threads": 1,
            "model": "tiny-llama LoRA (hidden 128, vocabulary 1633), jobs/tiny-dialogsum.yaml",
        },
    }
    return [
        {
            "figure": "P1",
            "value": round(value, 3),
            "goal": 0.97,
            "detail": {
                "steps": TRAIN_STEPS,
                "dsum_1_worker_tokens_per_s": round(ours["train_tokens_per_s"], 1),
                "bare_loop_tokens_per_s": round(bare["tokens_per_s"], 1),
                "dsum_train_loss": round(ours["train_loss"], 4),
                "bare_train_loss": round(bare["mean_loss"], 4),
                "every_run_tokens_per_s": {
                    "bare": [round(_tokens_per_s(r), 1) for r in bares],
                    "dsum": [round(_tokens_per_s(r), 1) for r in runs],
                },  # fmt: skip
                "dsum_step_ms": ours["step_ms"],
                "threads": 1,
                "model": "tiny-llama LoRA (jobs/tiny-dialogsum.yaml)",
            },
        },
        flops,
    ]


def p3_two_workers(workdir: Path) -> list[dict]:
    """Each measurement REPEATS times, interleaved (this machine's speed drifts by ±10–20% within minutes), each
    figure from the best run of each kind (as timeit takes the fastest: the others ran slower for reasons
    outside the code, other processes and the host), every run's tokens/s in the detail. Ray is shut down
    after each dsum run, so the bare loops run on an idle machine, as they would alone."""
    import ray

    def dsum_run(name: str, workers: int, sampler: str = "random") -> dict:
        return _dsum_train_alone(
            workdir, name, f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "train.global_batch_size=16",
            f"train.sampler={sampler}",
        )  # fmt: skip

    runs: dict[str, list] = {kind: [] for kind in ("alone", "paired", "bare_ddp", "bare_in_ray", "one", "two",
                                                   "rebalanced")}  # fmt: skip
    for rep in range(REPEATS):
        alone, paired = _bare_alone_and_paired(threads=1)
        runs["alone"].append(alone)
        runs["paired"].append(paired)
        runs["bare_ddp"].append(_with_cpu_use(_bare_ddp, workers=2, threads=1))
        runs["bare_in_ray"].append(_with_cpu_use(_bare_ddp_in_ray_train, workdir))
        ray.shutdown()
        runs["one"].append(dsum_run(f"p3-one-{rep}", 1))
        runs["two"].append(_with_cpu_use(dsum_run, f"p3-two-{rep}", 2))
        runs["rebalanced"].append(dsum_run(f"p3-rebalanced-{rep}", 2, "batch_rebalance"))

    best = {kind: max(found, key=_tokens_per_s) for kind, found in runs.items()}
    every = {kind: [round(_tokens_per_s(r), 1) for r in found] for kind, found in runs.items()}
    one, two, bare, in_ray, rebalanced = (best[k] for k in ("one", "two", "bare_ddp", "bare_in_ray", "rebalanced"))
    machine = {
        "two_bare_loops_at_once_vs_one_alone": round(best["paired"] / best["alone"], 3),
        "bare_ddp_vs_bare_loop_alone": round(_tokens_per_s(bare) / best["alone"], 3),
        "bare_loop_alone_tokens_per_s": round(best["alone"], 1),
        "note": "two independent processes of the bare loop (no communication) show what the machine's cores "
        "allow; the bare DDP loop adds lockstep steps (each waits for the slower process's batch) and the "
        "all-reduce: what data parallelism itself costs here, with or without dsum",
    }  # fmt: skip
    return [
        {
            "figure": "P3",
            "value": round(_tokens_per_s(two) / _tokens_per_s(one), 3),
            "goal": 1.7,
            "detail": {
                "steps": TRAIN_STEPS,
                "global_batch": 16,
                "one_worker": "micro batch 8 × accumulation 2",
                "two_workers": "micro batch 8 each",
                "sampler": "random",
                "one_worker_tokens_per_s": round(_tokens_per_s(one), 1),
                "two_workers_tokens_per_s": round(_tokens_per_s(two), 1),
                "one_worker_step_ms": one["step_ms"],
                "two_workers_step_ms": two["step_ms"],
                "machine": machine,
                "every_run_tokens_per_s": every,
                "threads_per_worker": 1,
                "backend": "DDP over gloo",
            },
        },
        {
            "figure": "P3-bare",
            "value": round(_tokens_per_s(two) / _tokens_per_s(bare), 3),
            "goal": 0.95,
            "detail": {
                "steps": TRAIN_STEPS,
                "global_batch": 16,
                "micro_batch_per_process": 8,
                "sampler": "random (DistributedSampler)",
                "dsum_two_workers_tokens_per_s": round(_tokens_per_s(two), 1),
                "bare_ddp_two_processes_tokens_per_s": round(_tokens_per_s(bare), 1),
                "dsum_train_loss": round(two["train_loss"], 4),
                "bare_train_loss": round(bare["mean_loss"], 4),
                "step_ms_note": "rank 0, mean per step after the first; backward includes the all-reduce and "
                "clipping (and for dsum the Trainer's token count across workers); between is the next batch "
                "and, for dsum, logging, reports to Ray and callbacks",
                "bare_ddp_in_ray_train_tokens_per_s": round(_tokens_per_s(in_ray), 1),
                "ray_share": {
                    "bare_in_ray_train_vs_bare": round(_tokens_per_s(in_ray) / _tokens_per_s(bare), 3),
                    "dsum_vs_bare_in_ray_train": round(_tokens_per_s(two) / _tokens_per_s(in_ray), 3),
                    "note": "the same bare loop as the function of Ray Train's workers: what running in Ray's "
                    "worker processes costs (Ray's own processes share the two cores with two one-thread "
                    "workers), apart from what dsum's stack (HF Trainer, callbacks, reports) costs",
                },
                "dsum_step_ms": two["step_ms"],
                "bare_in_ray_train_step_ms": in_ray["step_ms"],
                "cpu_cores_while_training": {
                    "bare_ddp": bare["cpu"],
                    "bare_in_ray_train": in_ray["cpu"],
                    "dsum": two["cpu"],
                },  # fmt: skip
                "cpu_note": "cores used by each kind of process while both training processes computed (the best "
                "run of each): the two training processes (each), Ray's processes, this driver, the rest; what "
                "the training processes leave of their two cores they spend waiting for each other's step and "
                "the all-reduce, or preempted by the others (Ray runs its workers at nice 15)",
                "bare_step_ms": bare["step_ms"],
                "bare_allreduce_alone_ms": bare["allreduce_alone_ms"],
                "threads_per_process": 1,
                "backend": "DDP over gloo",
            },
        },
        {
            "figure": "P3-padding",
            "value": round(_tokens_per_s(rebalanced) / _tokens_per_s(two), 3),
            "goal": None,
            "detail": {
                "workers": 2,
                "global_batch": 16,
                "batch_rebalance_tokens_per_s": round(_tokens_per_s(rebalanced), 1),
                "random_tokens_per_s": round(_tokens_per_s(two), 1),
                "real_token_share_random": round(_real_share("random", 1, 16), 3),
                "real_token_share_batch_rebalance": round(_real_share("batch_rebalance", 1, 16), 3),
                "real_token_share_note": "one process, micro batch 8, global batch 16",
            },
        },
    ]


def _real_share(sampler: str, workers: int, global_batch: int, packing: bool = False) -> float:
    """Real tokens ÷ computed tokens (real + padding) over one epoch of the job's own training data loader (its
    sampler and collator) in one process."""
    from dsum import model, train

    job = _job(
        f"train.sampler={sampler}", f"scaling.num_workers={workers}", f"train.global_batch_size={global_batch}",
        f"data.packing={str(packing).lower()}",
    )  # fmt: skip
    tokenizer = model.load_tokenizer(job.model)
    prepared = train.prepare_data(job, tokenizer)
    net = model.apply_method(model.load_base(job.model, job.method), job.model.task, job.method)
    with tempfile.TemporaryDirectory() as out:
        trainer = train._trainer(job, net, tokenizer, prepared.tokenized, Path(out), ())
        real = computed = 0
        for batch in trainer.get_train_dataloader():
            real += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
            computed += batch["input_ids"].numel()
    return real / computed


def p2_packing(workdir: Path) -> dict:
    padded_share, packed_share = _real_share("random", 1, 8), _real_share("random", 1, 8, packing=True)
    padded = _dsum_train(workdir, "p2-padded", "scaling.num_workers=1", "scaling.cpus_per_worker=1")
    packed = _dsum_train(
        workdir, "p2-packed", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "data.packing=true"
    )
    return {
        "figure": "P2",
        "value": round(packed_share, 3),
        "goal": 0.95,
        "detail": {
            "real_token_share_packed": round(packed_share, 3),
            "real_token_share_padded": round(padded_share, 3),
            "packed_tokens_per_s": round(packed["train_tokens_per_s"], 1),
            "padded_tokens_per_s": round(padded["train_tokens_per_s"], 1),
            "packed_over_padded_tokens_per_s": round(packed["train_tokens_per_s"] / padded["train_tokens_per_s"], 3),
            "micro_batch": 8,
            "data": "bundled dialogues (jobs/tiny-dialogsum.yaml), random batches",
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
    """Three sweeps of the default job through dsum's own `dsum tune` path (pipeline.run_sweep): the same
    seeded random search over LoRA rank and learning rate, with ASHA's promotions (tune.scheduler:
    asha-promote; an evaluation every 3 steps, rungs at steps 3, 9 and 27: reduction factor 3, grace period
    one evaluation), with Ray's ASHA (asha) on the same rungs, and with every trial run out. Steps are the
    optimizer steps each trial reported last."""
    import ray

    from dsum import pipeline

    space = "{method.r: {choice: [4, 8, 16, 32]}, train.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}}"

    def sweep(name: str, scheduler: str) -> dict:
        job = _job(
            f"train.max_steps={SWEEP_STEPS}", f"train.eval_steps={SWEEP_EVAL_STEPS}", "train.warmup_ratio=0",
            f"train.output_dir={workdir}", f"train.run_name={name}", "tracking.enabled=false",
            f"tune.space={space}", f"tune.num_samples={SWEEP_TRIALS}", "tune.seed=0",
            f"tune.scheduler={scheduler}", "tune.grace_period=1", "tune.reduction_factor=3",
        )  # fmt: skip
        start = time.perf_counter()
        try:
            out = pipeline.run_sweep(job, "jobs/tiny-dialogsum.yaml", fresh=True).as_dict()
            return out | {"wall_s": time.perf_counter() - start}
        finally:  # each sweep starts its own Ray, as a user's `dsum tune` does (and none inherits another's)
            ray.shutdown()

    runs = {s: sweep(f"p5-{s}", s) for s in ("asha-promote", "asha", "none")}
    configs = {s: sorted(tuple(sorted(t["params"].items())) for t in r["trials"]) for s, r in runs.items()}
    if len({repr(c) for c in configs.values()}) != 1:
        raise RuntimeError(f"P5: the sweeps sampled different configurations: {configs}")
    steps = {s: sum(t["step"] or 0 for t in r["trials"]) for s, r in runs.items()}
    full = runs["none"]["best"]

    def cost(s: str) -> dict:
        """Where a sweep's time went: its trials' segments (a start, or a resumption after a pause), their
        start-up (a trial's function start to its first optimizer step) and their training after it, summed
        over trials (trial-seconds: two trials at once count twice), beside the sweep's wall-clock."""
        trials = runs[s]["trials"]
        return {
            "wall_s": round(runs[s]["wall_s"], 1),
            "segments": sum(t["segments"] for t in trials),
            "startup_s": round(sum(t["startup_s"] or 0 for t in trials), 1),
            "train_s": round(sum(t["train_s"] or 0 for t in trials), 1),
            "startup_parts_s": {
                k: round(sum(t["startup_parts"].get(k, 0) for t in trials), 1) for k in trials[0]["startup_parts"]
            },  # fmt: skip
        }

    def outcome(s: str) -> dict:
        best = runs[s]["best"]
        return {
            "steps": steps[s],
            "ratio": round(steps[s] / steps["none"], 3),
            "stopped_early": sum(t["stopped_early"] for t in runs[s]["trials"]),
            "same_best": best["params"] == full["params"],
            "best": best["params"] | {"eval_loss": round(best["eval_loss"], 4)},
            "wall_s": round(runs[s]["wall_s"]),
        }

    wall = {s: round(runs[s]["wall_s"] / runs["none"]["wall_s"], 3) for s in runs}
    p5_wall = {
        "figure": "P5-wall",
        "value": wall["asha-promote"],
        "goal": 0.5,
        "same_best": outcome("asha-promote")["same_best"],
        "detail": {
            "trials": SWEEP_TRIALS,
            "asha-promote": {"ratio": wall["asha-promote"], **cost("asha-promote")},
            "asha (Ray's ASHAScheduler)": {
                "ratio": wall["asha"],
                "same_best": outcome("asha")["same_best"],
                **cost("asha"),
            },
            "full": cost("none"),
            "concurrent_trials": runs["none"]["max_concurrent_trials"],
        },
    }
    return [{
        "figure": "P5",
        "value": outcome("asha-promote")["ratio"],
        "goal": 0.4,
        "same_best": outcome("asha-promote")["same_best"],
        "detail": {
            "trials": SWEEP_TRIALS,
            "asha-promote": outcome("asha-promote"),
            "asha (Ray's ASHAScheduler)": outcome("asha"),
            "steps_full": steps["none"],
            "wall_s_full": round(runs["none"]["wall_s"]),
            "best_full": full["params"] | {"eval_loss": round(full["eval_loss"], 4)},
            "max_steps": SWEEP_STEPS,
            "eval_steps": SWEEP_EVAL_STEPS,
            "scheduler": "on eval_loss, grace 1 evaluation, reduction factor 3",
            "concurrent_trials": runs["none"]["max_concurrent_trials"],
        },
    }, p5_wall]  # fmt: skip


def p6_quantization(workdir: Path) -> dict:
    import seeds
    import torch

    from dsum import config, memory, model

    def weights(layers: int) -> dict[str, int]:
        path = seeds.build_model("lora", workdir / f"mistral-{layers}", False, shape={"num_hidden_layers": layers},
                                 dtype=torch.bfloat16)  # fmt: skip
        out = {}
        for name, method in {"bf16": "method.name=lora", "nf4": "method.name=qlora"}.items():
            job = config.load(ROOT / "jobs" / "mistral-7b-samsum-lora.yaml", [f"model.name={path}", method,
                              *(["method.bits=4", "method.compute_dtype=bfloat16"] if name == "nf4" else [])])  # fmt: skip
            out[name] = memory.weight_bytes(model.load_base(job.model, job.method))
        return out

    one, two = weights(1), weights(2)
    full = {k: one[k] + 31 * (two[k] - one[k]) for k in one}  # the other layers are copies of the second's shape
    peaks = seeds.run(["wide-lora", "wide-qlora"], gpu=torch.cuda.is_available())
    lora, qlora = peaks
    return {
        "figure": "P6",
        "value": round(full["nf4"] / full["bf16"], 3),
        "goal": 0.3,
        "detail": {
            "model": "Mistral-7B-Instruct-v0.2's architecture, random weights; 4-bit nf4 without double quantization",
            "bf16_gib_32_layers": round(full["bf16"] / 2**30, 2),
            "nf4_gib_32_layers": round(full["nf4"] / 2**30, 2),
            "per_layer_mib": {k: round((two[k] - one[k]) / 2**20, 1) for k in two},
            "embeddings_and_head_mib": {k: round((2 * one[k] - two[k]) / 2**20, 1) for k in two},
            "qlora_over_lora_peak": round(qlora["measured_peak_gib"] / lora["measured_peak_gib"], 3),
            "lora_peak_gib": lora["measured_peak_gib"],
            "qlora_peak_gib": qlora["measured_peak_gib"],
            "peak_run": f"3 steps, {lora['device']}: two Mistral layers at hidden 2048 (bench/seeds.py WIDE), 128 tokens; on the CPU LoRA's base is fp32 and QLoRA computes in fp32",
        },
    }


def gpu_tier(layers: int | None, kinds: list[str] | None = None) -> list[dict]:
    """dsum plan's estimate vs the measured peak of the seed jobs (bench/seeds.py): every seed family on a
    GPU; on the CPU the Mistral LoRA and Gemma QLoRA jobs unless `kinds` says otherwise."""
    import seeds
    import torch

    gpu = torch.cuda.is_available()
    out = []
    for r in seeds.run(kinds or (seeds.SEED_FAMILIES if gpu else ["lora", "qlora"]), gpu=gpu, layers=layers):
        out.append(
            {"figure": f"plan-{r['kind']}", "value": r["planned_over_measured"], "goal": "0.75-1.25", "detail": r}
        )
    return out


P7_ROWS = 288


def p7_evaluation_workers(workdir: Path) -> dict:
    """A tiny run's evaluation over the first P7_ROWS dialogues of the bundled training split (more than the
    test split's 36, so that the pool has batches to share: 36 of 8), its fine-tuned model only, generated by a
    Ray Data pool of 1 worker and of 2 (one CPU and one thread each, dsum.cluster.evaluate), on the local Ray
    dsum starts. The model is trained 12 steps, so its summaries run on to max_new_tokens (160): every batch
    does about the same work, as a large model's long summaries would. Dialogues/s over the pool's generation:
    from its first worker ready (models loaded) to its last batch out; the whole call (Ray Data's start, the
    workers' imports and model loads) in the detail."""
    import functools

    import ray

    from dsum import data, rundir
    from dsum.cluster import evaluate, launch
    from dsum.eval import predict

    _dsum_train(workdir, "p7", "train.max_steps=12", "scaling.num_workers=1")
    launch.connect()  # (the local Ray the run started)
    run = rundir.RunDir(workdir / "p7")
    settings = ["eval.compare_base=false", "eval.batch_size=8", "eval.max_new_tokens=160", "eval.cpus_per_worker=1"]
    job = rundir.load_job(run, settings)
    rows = data.load_splits(job.data, job.model.task)[0]["train"].select(range(P7_ROWS))
    measured, outputs = {}, {}
    for workers in (1, 2):
        pool = job.model_copy(update={"eval": job.eval.model_copy(update={"workers": workers})})
        out_dir = workdir / f"p7-eval-{workers}"
        out_dir.mkdir()
        times: list[dict] = []
        start = time.time()
        runner = functools.partial(evaluate.runner(pool), times=times)
        outputs[workers] = predict.predict(pool, run.final, rows, out_dir, predict.key(pool, run.final, rows), runner)
        wall = time.time() - start
        generation = max(t["ended"] for t in times) - min(t["ready"] for t in times)
        measured[workers] = {
            "dialogues_per_s": round(P7_ROWS / generation, 2),
            "generation_s": round(generation, 2),
            "whole_call_s": round(wall, 2),
            "workers_seen": len({t["ready"] for t in times}),
        }
    ray.shutdown()
    return {
        "figure": "P7",
        "value": round(measured[2]["dialogues_per_s"] / measured[1]["dialogues_per_s"], 3),
        "goal": 1.8,
        "detail": {
            "rows": P7_ROWS,
            "batches": len(predict.batches(job, run.final, predict.texts(job, rows))),
            "batch_size": 8,
            "max_new_tokens": job.eval.max_new_tokens,
            "one_worker": measured[1],
            "two_workers": measured[2],
            "same_predictions": outputs[1] == outputs[2],
            "threads_per_worker": 1,
            "mean_summary_words": round(sum(len(p.split()) for p in outputs[1]["tuned"]) / P7_ROWS, 1),
            "model": "tiny-llama LoRA (jobs/tiny-dialogsum.yaml, 12 steps)",
        },
    }


FIGURES = {
    "P1": p1_ray_overhead,
    "P2": p2_packing,
    "P3": p3_two_workers,
    "P4": p4_batched_generation,
    "P5": p5_asha_sweep,
    "P6": p6_quantization,
    "P7": p7_evaluation_workers,
}
NEEDS_WORKDIR = {"P1", "P2", "P3", "P5", "P6", "P7"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated figures, e.g. P4")
    parser.add_argument("--gpu", action="store_true", help="the seed jobs' planned vs measured peak memory only")
    parser.add_argument("--layers", type=int, help="with --gpu on a GPU: build the seed models with this many layers")
    parser.add_argument(
        "--kinds",
        help="with --gpu: comma-separated seed runs of bench/seeds.py (default: all on a GPU, lora,qlora on CPU)",
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]}; known: {', '.join(FIGURES)}")
    # Ray forwards its workers' logs to stdout; the figures alone go there.
    figures_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.gpu:
        for figure in gpu_tier(args.layers, args.kinds.split(",") if args.kinds else None):
            print(json.dumps(figure), file=figures_out, flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="dsum-bench-") as workdir:
        for name in names:
            figures = FIGURES[name](Path(workdir)) if name in NEEDS_WORKDIR else FIGURES[name]()
            for figure in figures if isinstance(figures, list) else [figures]:
                print(json.dumps(figure), file=figures_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dsum benchmarks: each figure is a ratio measured within one run, printed as one JSON line:

    {"figure": "P4", "value": 12.3, "goal": 5, "detail": {...}}

    python bench/run.py                 # every figure
    python bench/run.py --only P4       # some of them

P4  batched generation vs one dialogue at a time (dialogues/s), tiny model, same dialogues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def p4_batched_generation(repeats: int = 3) -> dict:
    """The default job's evaluation (test split, its batch size and max_new_tokens) on its base model,
    batched vs batch size 1. Every dialogue gets exactly max_new_tokens in both ways (min_new_tokens), so
    the work is equal; the best of `repeats` timings of each counts."""
    import torch

    from dsum import config, data, evaluate, model

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
            evaluate.generate(base, tokenizer, dialogues, job.data, cfg, job.model.task)
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


FIGURES = {"P4": p4_batched_generation}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated figures, e.g. P4")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]}; known: {', '.join(FIGURES)}")
    for name in names:
        print(json.dumps(FIGURES[name]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

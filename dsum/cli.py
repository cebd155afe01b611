"""`dsum` command line. Nothing imports this module.

Every subcommand takes `--json` to print its result as one JSON object on stdout (logs and progress
bars go to stderr). Errors a user can fix print one line, `dsum: error: ...`, and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from dsum import config as config_mod
from dsum.config import DsumError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_runtime()
    try:
        # With --json, stdout carries only the result: library prints (Trainer logs) go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = args.func(args)
    except DsumError as e:
        print(f"dsum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsum: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    return 0


# ------------------------------------------------------------------------------------------- commands


def cmd_validate(args) -> dict[str, Any]:
    job = config_mod.load(args.job, args.overrides)
    if not args.json:
        print(yaml.safe_dump(job.to_dict(), sort_keys=False), end="")
    return {"job": str(args.job), "valid": True, "config": job.to_dict()}


def cmd_train(args) -> dict[str, Any]:
    job = config_mod.load(args.job, args.overrides)
    with _naming(args.job):
        if args.dry_run:
            from dsum.plan import plan

            result = plan(job)
            if not args.json:
                for key, value in result.items():
                    print(f"{key:>18}: {value}")
            return result
        from dsum.launch import run_job

        result = run_job(job)
    if not args.json:
        print(_results_table(result))
    return result


def cmd_merge(args) -> dict[str, Any]:
    from dsum.model import merge

    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise DsumError(f"{run}: not a dsum run directory (no config.yaml)")
    out = merge(run, Path(args.out) if args.out else run / "merged")
    if not args.json:
        print(f"merged model written to {out}")
    return {"merged": str(out)}


# ---------------------------------------------------------------------------------------------- output


def _results_table(r: dict[str, Any]) -> str:
    lines = [
        f"run: {r['run_dir']}  (step {r['global_step']}, {r['trainable_params']:,} of {r['total_params']:,} parameters trained)"
    ]
    lines.append(f"{r['split']} split: {r['examples']} examples, fingerprint {r['fingerprint']}")
    tuned = r["tuned"]
    base = r.get("base", {})
    lines.append(f"{'metric':<10} {'base':>8} {'tuned':>8} {'delta':>8}")
    for key in tuned:
        b = base.get(key)
        lines.append(
            f"{key:<10} {b if b is None else format(b, '.4f'):>8} {tuned[key]:>8.4f} "
            f"{'' if b is None else format(tuned[key] - b, '+.4f'):>8}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _naming(job: Path):
    """Errors raised while running a job also name the job file."""
    try:
        yield
    except config_mod.ConfigError:
        raise
    except DsumError as e:
        raise DsumError(f"{job}: {e}") from None


def _setup_runtime() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes tries to fetch an optional CPU kernel from the hub and falls back to its own; the
    # warning it logs on every import is noise. DeepSpeed, told the accelerator, does not probe for one.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fields_epilog() -> str:
    rows = [f"  {key} = {default}\n      {doc}" for key, default, doc in config_mod.field_docs()]
    return "job fields (override any with key=value):\n" + "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsum", description="Fine-tune LLMs for dialogue summarization, from a laptop CPU to a Ray cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, job: bool = True, epilog: str | None = None):
        p = sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if job:
            p.add_argument("job", type=Path, help="job YAML, e.g. jobs/tiny-dialogsum.yaml")
            p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.max_steps=200")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
        p.set_defaults(func=func)
        return p

    add("validate", cmd_validate, "check a job and print its resolved config", epilog=_fields_epilog())
    p = add(
        "train", cmd_train, "fine-tune, then score base vs fine-tuned on the held-out split", epilog=_fields_epilog()
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (model, method, steps, batch) and stop")
    p = add("merge", cmd_merge, "fold a run's LoRA adapter into its base and save the merged model", job=False)
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--out", help="output directory (default: RUN/merged)")
    parser.epilog = textwrap.dedent("""\
        examples:
          dsum validate jobs/tiny-dialogsum.yaml
          dsum train jobs/tiny-dialogsum.yaml train.max_steps=200 --json
        """)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


if __name__ == "__main__":
    sys.exit(main())

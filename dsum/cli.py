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
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import yaml

from dsum import config as config_mod
from dsum.errors import ConfigError, DsumError

_loaded_at: float | None = time.time()  # the command's start, for its first main() (interpreter start aside)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as dsum's one line (argparse prints the usage, then the error, and exits)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    global _loaded_at
    started, _loaded_at = _loaded_at or time.time(), None  # (a later main() in this process: its own start)
    parser = _parser()
    try:
        # overrides (a.b=value) may stand before, between or after flags
        args, extra = parser.parse_known_args(argv)
        if extra:
            if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except _UsageError as e:
        print(f"dsum: error: {e}", file=sys.stderr)
        return 2
    args.started = started
    if args.command in ("train", "tune", "eval", "summarize", "merge"):  # validate and --help stay light: no torch
        _setup_runtime()
    result_fd = None
    if args.json:
        # stdout carries only the result: everything else that writes to it (library prints, Ray's
        # forwarded worker logs, even after we finish) goes to stderr at the file-descriptor level.
        sys.stdout.flush()
        result_fd = os.dup(1)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = args.func(args)
    except DsumError as e:
        if os.environ.get("DSUM_DEBUG"):  # what went wrong underneath, for a bug report
            cause = e
            while cause.__context__ is not None:
                cause = cause.__context__
            traceback.print_exception(cause)
        print(f"dsum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # (one raised by dsum says where it stopped)
        print(f"dsum: {str(e) or 'interrupted; the same command resumes from the last checkpoint'}", file=sys.stderr)
        return 130
    if result_fd is not None:
        with os.fdopen(result_fd, "w") as out:
            out.write(json.dumps(result, default=str) + "\n")
    return 1 if result.get("promoted") is False else 0  # `dsum promote` refused


# ------------------------------------------------------------------------------------------- commands


def cmd_validate(args) -> dict[str, Any]:
    job = config_mod.load(args.job, args.overrides)
    if not args.json:
        print(yaml.dump(job.to_dict(), Dumper=config_mod.SAFE_DUMPER, sort_keys=False), end="")
    return {"job": str(args.job), "valid": True, "config": job.to_dict()}


def cmd_plan(args) -> dict[str, Any]:
    from dsum.plan import plan

    job = config_mod.load(args.job, args.overrides)
    memory = getattr(args, "memory", False)
    gpu_memory = None
    if getattr(args, "gpu_memory", None):
        from dsum.memory import parse_size

        try:
            gpu_memory = parse_size(args.gpu_memory)
        except ValueError as e:
            raise ConfigError(f"--gpu-memory: {e}") from None
    with _naming(args.job):
        result = plan(job, memory=memory, gpu_memory=gpu_memory)
    if not args.json:
        for key, value in result.items():
            if key != "memory":
                print(f"{key:>18}: {value}")
        if memory:
            print(_memory_table(result["memory"]))
    return result


def _memory_table(mem) -> str:
    from dsum.memory import GiB, format_size

    if isinstance(mem, str):
        return f"{'memory':>18}: {mem}"
    train, evaluation = mem["training_gib"], mem["evaluation_gib"]
    lines = [f"{'memory':>18}: per device, {mem['device']}, GiB", f"{'':>20}{'':<20}{'training':>10}{'evaluation':>12}"]
    for part in [*(p for p in dict.fromkeys([*train, *evaluation]) if p != "total"), "total"]:
        row = [f"{d[part]:.2f}" if part in d else "" for d in (train, evaluation)]
        lines.append(f"{'':>20}{part:<20}{row[0]:>10}{row[1]:>12}")
    a = mem["assumptions"]
    lines.append(f"{'assuming':>18}: " + ", ".join(f"{k}={v}" for k, v in a.items()))
    pool = mem.get("evaluation_workers")
    if pool is not None:
        lines.append(f"{'eval workers':>18}: {pool['workers']} × {pool['each_gib']:.2f} = {pool['together_gib']:.2f} "
                     f"GiB ({pool['where']}); the driver holds no model")  # fmt: skip
    rec = mem.get("recommendation")
    if rec is not None:
        budget = f"for {mem['gpu_memory']}"
        if rec["fits"]:
            lines.append(
                f"{budget:>18}: {rec['overrides']}  "
                f"(training {format_size(rec['training_gib'] * GiB)}{'' if rec['evaluation_fits'] else '; evaluation does not fit'})"
            )
        else:
            either = "" if rec["evaluation_fits"] else "; evaluation does not fit either"
            lines.append(f"{budget:>18}: does not fit: {rec['reason']}{either}")
    return "\n".join(lines)


def cmd_train(args) -> dict[str, Any]:
    if args.dry_run:
        return cmd_plan(args)
    job = config_mod.load(args.job, args.overrides)
    with _naming(args.job):
        from dsum.pipeline import run_job

        result = run_job(job, str(args.job), fresh=args.fresh, address=args.address, started=args.started).as_dict()
    if not args.json:
        print(_results_table(result))
    return result


def cmd_tune(args) -> dict[str, Any]:
    job = config_mod.load(args.job, args.overrides)
    with _naming(args.job):
        from dsum.pipeline import run_sweep

        result = run_sweep(job, str(args.job), fresh=args.fresh, address=args.address)
    if not args.json:
        print(f"sweep: {result.run}  ({len(result.trials)} trials, {result.concurrency} at once)")
        print(result.table)
        print(f"best: {result.best.trial_id}; its job: {result.best_job}  (dsum train {result.best_job})")
        if result.tracking:
            print(f"mlflow run: {result.tracking['run_id']} at {result.tracking['tracking_uri']}")
    return result.as_dict()


def cmd_fetch(args) -> dict[str, Any]:
    from dsum import fetch

    job = config_mod.load(args.job, args.overrides)
    with _naming(args.job):
        done = {"model": fetch.model(job.model), "data": fetch.data(job.data)}
    if not args.json:
        for part, what in done.items():
            print(f"{part}: {what}")
    return done


def _model_run(model: str, tracking_uri: str | None):
    """The run behind --model/--run: a run directory, or a registered version (models:/NAME@ALIAS or
    models:/NAME/VERSION) downloaded from the tracking server, with its NAME-vVERSION (None for a directory)."""
    from dsum import rundir

    if not model.startswith("models:/"):
        return rundir.find(model), None
    from dsum.model import cache_dir
    from dsum.tracking import registry, track

    ref = registry.parse_model_uri(model)  # (before a store is reached, or a local one made)
    uri = track.resolve_uri(tracking_uri)
    found = registry.registered_run(track.connect(uri, what="--tracking-uri"), ref, uri, cache_dir())
    return found.run, f"{found.name}-v{found.version}"


def cmd_eval(args) -> dict[str, Any]:
    from dsum import rundir
    from dsum.eval.run import evaluate_run

    run, registered = _model_run(args.run or args.model, args.tracking_uri)
    if registered:  # a registered version: its evaluations go to a run directory here, not into the cache
        run = rundir.local_copy(run, Path(args.out_dir) / registered)
    job = rundir.load_job(run, args.overrides)
    if args.max_samples:
        job = job.model_copy(update={"eval": job.eval.model_copy(update={"max_samples": args.max_samples})})
    runner = None
    if job.eval.workers:  # generation over a Ray cluster's workers
        from dsum.cluster import evaluate, launch

        launch.connect(args.address)
        runner = evaluate.runner(job)
    with _naming(run.config):
        result = evaluate_run(job, run, split=args.split, data_file=args.data, own=False, runner=runner).as_dict()
    if not args.json:
        print(_results_table(result | {"run_dir": str(run)}))
    return result


def cmd_summarize(args) -> dict[str, Any]:
    from dsum import rundir
    from dsum.eval.run import summarize

    run, _ = _model_run(args.model, args.tracking_uri)
    job = rundir.load_job(run, args.overrides)
    text = Path(args.file).read_text(encoding="utf-8") if args.file else sys.stdin.read()
    dialogues = _read_dialogues(text, args.file or "<stdin>")
    summaries = summarize(run, job, dialogues)
    if not args.json:
        for s in summaries:
            print(" ".join(s.split()))
    return {"summaries": summaries}


def _read_dialogues(text: str, where: str) -> list[str]:
    """JSON lines with a "dialogue" field, or plain dialogues separated by blank lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        out = []
        for n, line in enumerate(lines, 1):
            try:
                out.append(json.loads(line)["dialogue"])
            except (ValueError, KeyError, TypeError):
                raise DsumError(f'{where}: line {n}: not a JSON object with a "dialogue" field') from None
        return out
    dialogues = [block.strip() for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    if not dialogues:
        raise DsumError(f"{where}: no dialogue to summarize")
    return dialogues


def cmd_merge(args) -> dict[str, Any]:
    from dsum import rundir
    from dsum.model import merge

    run = Path(args.run)
    if not (run / rundir.CONFIG).exists():
        raise DsumError(f"{run}: not a dsum run directory (no {rundir.CONFIG})")
    out = merge(run, Path(args.out) if args.out else run / "merged")
    if not args.json:
        print(f"merged model written to {out}")
    return {"merged": str(out)}


def _registry_client(args):
    from dsum.tracking.track import connect, resolve_uri

    return connect(resolve_uri(args.tracking_uri), args.retries, args.timeout_s, what="--tracking-uri")


def cmd_promote(args) -> dict[str, Any]:
    from dsum.tracking import registry

    decision = registry.promote(_registry_client(args), args.model, args.candidate, args.margin, args.min_ci_low)
    if not args.json:
        verdict = "promoted to champion" if decision["promoted"] else "refused"
        print(f"{args.model} v{decision['candidate']}: {verdict}: {decision['reason']}")
    return decision


def cmd_rollback(args) -> dict[str, Any]:
    from dsum.tracking import registry

    result = registry.rollback(_registry_client(args), args.model)
    if not args.json:
        print(f"{args.model}: champion is v{result['champion']} again (v{result['demoted']} demoted)")
    return result


def cmd_k8s_render(args) -> dict[str, Any]:
    from dsum.deploy import k8s

    job = config_mod.load(args.job, args.overrides)
    opts = k8s.Options(
        sweep=args.sweep,
        schedule=args.schedule,
        time_zone=args.time_zone,
        via=args.via,
        image=args.image,
        trials_at_once=args.trials_at_once,
        deadline_hours=args.deadline_hours,
        worker_memory=args.worker_memory,
        namespace=args.namespace,
        queue=args.queue,
    )
    with _naming(args.job):
        objs = k8s.render(job, str(args.job), opts)
    text = k8s.to_yaml(objs, k8s.header(str(args.job), opts))
    if args.out:
        from dsum import rundir

        try:
            rundir.write_text(Path(args.out), text)
        except OSError as e:
            raise DsumError(f"--out {args.out}: can't write the manifests there ({e.strerror or e})") from None
        if not args.json:
            print(f"wrote {len(objs)} objects to {args.out}: {', '.join(o['kind'] for o in objs)}", file=sys.stderr)
    elif not args.json:
        print(text, end="")
    return {"job": str(args.job), "out": args.out, "objects": objs}


# ---------------------------------------------------------------------------------------------- output


def _results_table(r: dict[str, Any]) -> str:
    head = f"run: {r['run_dir']}"
    if "global_step" in r:
        head += f"  (step {r['global_step']}, {r['trainable_params']:,} of {r['total_params']:,} parameters trained)"
    lines = [head, f"{r['split']}: {r['examples']} examples, fingerprint {r['fingerprint']}"]
    lines.append(f"{'metric':<11} {'base':>8} {'tuned':>8} {'delta':>8}  95% CI of delta")
    for key, m in r["metrics"].items():
        base = "" if m.get("base") is None else f"{m['base']:.4f}"
        delta = "" if m.get("delta") is None else f"{m['delta']:+.4f}"
        ci = "" if m.get("ci_low") is None else f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"
        lines.append(f"{key:<11} {base:>8} {m['tuned']:>8.4f} {delta:>8}  {ci}")
    if r.get("report"):
        lines.append(f"report: {r['report']}")
    tracked = r.get("tracking") or {}
    if tracked.get("run_id"):
        lines.append(f"mlflow run: {tracked['run_id']} at {tracked['tracking_uri']}; {_mlflow_ui(tracked)}")
    if tracked.get("model_version"):
        verdict = "champion" if tracked["champion"] else "not champion"
        lines.append(
            f"registered: {tracked['registered_model']} v{tracked['model_version']}, {verdict}: {tracked['reason']}"
        )
    elif tracked.get("run_id") and "global_step" in r:
        lines.append("registered: nothing (tracking.registered_model is not set)")
    return "\n".join(lines)


def _mlflow_ui(tracked: dict[str, Any]) -> str:
    """How to look at the run: the server's page, or the command that serves a local store."""
    uri, page = tracked["tracking_uri"], f"#/experiments/{tracked.get('experiment_id', '')}/runs/{tracked['run_id']}"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"to open it: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


@contextlib.contextmanager
def _naming(job: Path):
    """Errors raised while running a job also name the job file."""
    try:
        yield
    except ConfigError:
        raise
    except DsumError as e:
        raise DsumError(f"{job}: {e}") from None


def _setup_runtime() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A failed run is reported as one line; Ray would also print the traceback of every failed task whose
    # result nobody fetched (the workers' own logs keep them).
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # bitsandbytes tries to fetch an optional CPU kernel from the hub and falls back to its own; the
    # warning it logs on every import is noise. DeepSpeed, told the accelerator, does not probe for one.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # The terminal shows dsum's progress and results: the libraries' deprecation notices (meant for their
    # callers' authors, as on the workers: launch.build_trainer), progress bars of loading weights and of
    # MLflow's artifact copies, and MLflow's note on first creating a store's tables are not for a dsum user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fields_epilog() -> str:
    rows = [f"  {key} = {default}\n      {doc}" for key, default, doc in config_mod.field_docs()]
    return "job fields (override any with key=value):\n" + "\n".join(rows)


def _registry_flags(p: argparse.ArgumentParser, gate) -> None:
    p.add_argument("--tracking-uri", help="MLflow server or store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--retries", type=int, default=gate.retries, help="retries of each request to the server")
    p.add_argument("--timeout-s", type=int, default=gate.timeout_s, help="seconds before a request times out")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "plan",
        cmd_plan,
        "what a job would do, without data or weights: model, method, batch, steps, parameters (trainable and "
        "total, from the model's shape on the meta device) and memory per device (weights, adapters, gradients, "
        "optimizer states, activations; ZeRO partitions), for training and for evaluation",
        epilog=_fields_epilog(),
    )
    p.add_argument(
        "--gpu-memory", help="memory of one GPU (e.g. 24GiB, 80GB): recommend micro batch, checkpointing, strategy"
    )
    p.set_defaults(memory=True)
    p = add(
        "train", cmd_train, "fine-tune, then score base vs fine-tuned on the held-out split", epilog=_fields_epilog()
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (model, method, steps, batch) and stop")
    p.add_argument("--address", default=None, help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--fresh", action="store_true", help="start the named run over instead of resuming it")
    p = add(
        "tune",
        cmd_tune,
        "search hyperparameters (the job's tune section) with Ray Tune and ASHA",
        epilog=_fields_epilog(),
    )
    p.add_argument("--address", default=None, help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--fresh", action="store_true", help="start the named sweep over instead of resuming it")
    add(
        "fetch",
        cmd_fetch,
        "download a job's base model and hub dataset into the Hugging Face cache (HF_HOME), once, before its "
        "workers start (a Kubernetes RayJob does this first, so that trials share one download)",
    )
    p = add("eval", cmd_eval, "score a trained run (base vs fine-tuned) and write its report", job=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run directory (runs/<name>) or its final/ adapter directory")
    which.add_argument("--model", help="or a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", help="the registry of --model (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument(
        "--out-dir",
        default=config_mod.TrainConfig.model_fields["output_dir"].default,
        help="where --model's run directory (NAME-vVERSION) is made",
    )
    p.add_argument("--split", choices=["validation", "test"], help="held-out split (default: the job's eval.split)")
    p.add_argument("--data", help="a local .jsonl/.json/.csv/.parquet file to score instead of a split")
    p.add_argument("--max-samples", type=int, help="score at most N examples")
    p.add_argument(
        "--address",
        default=None,
        help="with eval.workers=N: the Ray cluster to generate on (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "overrides", nargs="*", help="a.b=value overrides of the run's config, e.g. data.columns.summary=[s1,s2]"
    )
    p = add("summarize", cmd_summarize, "summarize dialogues from a file or stdin with a trained run", job=False)
    p.add_argument(
        "--model",
        required=True,
        help="run directory (runs/<name>) or its final/ adapter directory, or a registered version: "
        "models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    p.add_argument("--tracking-uri", help="the registry of --model (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument(
        "file", nargs="?", help="dialogues: JSON lines with a dialogue field, or text blocks separated by blank lines"
    )
    p.add_argument("overrides", nargs="*", default=[], help="a.b=value overrides, e.g. eval.num_beams=4")
    p = add("merge", cmd_merge, "fold a run's LoRA adapter into its base and save the merged model", job=False)
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--out", help="output directory (default: RUN/merged)")
    gate = config_mod.TrackingConfig()
    p = add("promote", cmd_promote, "make a registered version champion if it beats the champion", job=False)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--candidate", required=True, help="version to promote")
    p.add_argument("--margin", type=float, default=gate.promote_margin, help="gain in ROUGE-L (accuracy) needed")
    p.add_argument(
        "--min-ci-low", type=float, default=gate.promote_min_ci_low, help="the gain's 95%% CI must lie above this"
    )
    _registry_flags(p, gate)
    p = add("rollback", cmd_rollback, "make the previous champion champion again", job=False)
    p.add_argument("--model", required=True, help="registered model name")
    _registry_flags(p, gate)
    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests for a job", description="Kubernetes (KubeRay)")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    p = k8s_sub.add_parser(
        "render",
        help="a job as a RayJob (training or sweep), or a scheduled sweep, with the job in a ConfigMap",
        description="Write the manifests of a job: a ConfigMap holding the job and a RayJob whose Ray cluster is "
        "sized from the job's scaling section; --sweep: a RayJob running `dsum tune`; --schedule: a sweep on a "
        "schedule (a CronJob that creates the RayJob, or a RayCronJob), after which the best configuration is "
        "trained and registered as a version that waits for `dsum promote`.",
    )
    p.add_argument("job", type=Path, help="job YAML, e.g. jobs/mistral-7b-samsum-lora.yaml")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. scaling.num_workers=4")
    p.add_argument("--sweep", action="store_true", help="run `dsum tune` (the job's tune section) instead of train")
    p.add_argument("--schedule", metavar="CRON", help="a scheduled sweep, at most daily, e.g. '0 3 * * *'")
    p.add_argument("--time-zone", default="Etc/UTC", help="time zone of --schedule (default: Etc/UTC)")
    p.add_argument(
        "--via",
        choices=["cronjob", "raycronjob"],
        default="cronjob",
        help="scheduler: a Kubernetes CronJob that creates the RayJob (default), or a KubeRay RayCronJob: alpha "
        "in KubeRay v1.7 and off by default, it fires only once the operator runs with the RayCronJob feature gate "
        "(Helm: -f k8s/operator/values.yaml; kustomize install: --feature-gates=RayCronJob=true). Either way a "
        "scheduled run that finds the previous one still running starts nothing and says so",
    )
    p.add_argument(
        "--queue",
        help="a Kueue LocalQueue: the RayJob carries its label and starts suspended, so Kueue admits its whole Ray "
        "cluster at once or not at all (with --via cronjob)",
    )
    p.add_argument("--image", help="dsum container image (default: 'dsum', for kustomize's images: to set)")
    p.add_argument(
        "--trials-at-once", type=int, help="a sweep's concurrent trials (default: tune.max_concurrent_trials, else 2)"
    )
    p.add_argument("--deadline-hours", type=float, default=24.0, help="the RayJob's activeDeadlineSeconds, in hours")
    p.add_argument("--worker-memory", help="memory per Ray worker pod (default: 48Gi with a GPU, else 4Gi per CPU)")
    p.add_argument("--namespace", help="metadata.namespace of every object (default: none, kubectl's)")
    p.add_argument("--out", help="write the manifests to this file instead of stdout")
    p.add_argument("--json", action="store_true", help="print the objects as one JSON object on stdout")
    p.set_defaults(func=cmd_k8s_render)
    parser.epilog = textwrap.dedent("""\
        examples:
          dsum validate jobs/tiny-dialogsum.yaml
          dsum train jobs/tiny-dialogsum.yaml train.max_steps=200 --json
          dsum k8s render jobs/mistral-7b-samsum-lora.yaml > mistral-rayjob.yaml
        """)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


if __name__ == "__main__":
    sys.exit(main())

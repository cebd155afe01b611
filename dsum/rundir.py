"""The run directory: the one place that knows its file and folder names, publishes into it atomically,
and finds and loads a finished run.

    runs/<run>/
      config.yaml          the resolved job (re-runnable)
      final/               adapter (or full weights) + tokenizer
      train_metrics.json   what training reported: losses, parameter counts, tokens/s, splits
      tracking.json        the MLflow run this run logs to (a resumed run continues it)
      results.json         base vs fine-tuned metrics, training metrics, tracking outcome
      eval/<split|file>/   report.md, scores_boxplot.png, predictions.jsonl, eval.json

    runs/<sweep>/          a `dsum tune` sweep: config.yaml, tracking.json (its parent MLflow run), and
      sweep.json           the trials ranked by the metric (values, metric, steps, stopped early)
      best.yaml            the best trial's job, ready for `dsum train`

Only the driver writes here: on a cluster the workers never see this directory (they share only the
storage path, where Ray keeps the checkpoints: dsum.cluster.resume), so everything that lands here arrives
through Ray's results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsum.errors import DsumError

CONFIG = "config.yaml"
FINAL = "final"
TRAIN_METRICS = "train_metrics.json"
TRACKING = "tracking.json"
RESULTS = "results.json"
EVAL = "eval"
SWEEP = "sweep.json"
BEST = "best.yaml"
# in each eval/<name>/ folder
PREDICTIONS = "predictions.jsonl"
EVAL_SUMMARY = "eval.json"
REPORT = "report.md"
BOX_PLOT = "scores_boxplot.png"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def final(self) -> Path:
        """The published weights (put back first if a publish was cut between its two renames: `restore`)."""
        restore(self.path / FINAL)
        return self.path / FINAL

    @property
    def train_metrics(self) -> Path:
        return self.path / TRAIN_METRICS

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def eval_dir(self, name: str) -> Path:
        return self.path / EVAL / name

    def new_eval_dir(self, name: str) -> Path:
        """eval/<name>/, or eval/<name>-2/, -3, … : the first that doesn't exist yet."""
        path, n = self.eval_dir(name), 1
        while path.exists():
            n += 1
            path = self.eval_dir(f"{name}-{n}")
        return path

    def __str__(self) -> str:
        return str(self.path)


def locate(job) -> RunDir:
    """Where the job's run directory goes (nothing is created): train.output_dir/<run name>."""
    name = job.train.run_name or f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunDir((Path(job.train.output_dir) / name).resolve())


def check_creatable(run: RunDir) -> None:
    """That the run directory can be made, found without making it: its nearest existing ancestor is a
    directory this process can create entries in (tried with an empty probe directory, removed at once)."""
    ancestor = run.path
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(ancestor))
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".dsum-probe-"))
    except OSError as e:
        raise _cannot_create(run, e) from None


def _cannot_create(run: RunDir, e: OSError) -> DsumError:
    return DsumError(f"train.output_dir: can't create the run directory {run.path}: {e.strerror or e}")


def create(job, fresh: bool = False, run: RunDir | None = None) -> RunDir:
    """The run's directory (`run`, else `locate(job)`) with its resolved config; a named run that exists is
    reused (resume)."""
    import yaml

    run = run or locate(job)
    if fresh:
        shutil.rmtree(run.path, ignore_errors=True)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_create(run, e) from None
    write_text(run.config, yaml.safe_dump(job.to_dict(), sort_keys=False))
    return run


def find(path: str | Path) -> RunDir:
    """A finished run from its directory or its final/ directory."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / CONFIG).exists() and RunDir(candidate).final.exists():
            return RunDir(candidate.resolve())
    raise DsumError(f"{path}: not a finished dsum run (no {CONFIG} beside a {FINAL}/ directory)")


def local_copy(run: RunDir, dest: Path) -> RunDir:
    """A run directory at `dest` holding `run`'s config and weights (copied once; what is there is kept)."""
    if not (dest / CONFIG).exists() or not (dest / FINAL).exists():
        dest.mkdir(parents=True, exist_ok=True)
        with staged(dest / FINAL) as partial:
            shutil.copytree(run.final, partial, dirs_exist_ok=True)
        write_text(dest / CONFIG, run.config.read_text())
    return RunDir(dest.resolve())


def load_job(run: RunDir, overrides=()):
    from dsum import config

    return config.load(run.config, overrides)


@contextlib.contextmanager
def staged(dest: Path):
    """A directory to fill; on success it replaces `dest` (publish), on failure it is removed: `dest` is,
    to every reader, either the old complete directory or the new complete one."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, dest)


def publish(src: Path, dest: Path) -> None:
    """Move a finished directory into place, replacing an older one: the older is renamed aside, the new one
    renamed into place, then the older removed. (A directory can't be renamed over a non-empty one.) A
    process killed between the two renames leaves the older one aside and no `dest`; `restore`, which every
    reader goes through (RunDir.final), puts it back."""
    restore(dest)
    aside = _aside(dest)
    if dest.exists():
        os.replace(dest, aside)
    os.replace(src, dest)
    shutil.rmtree(aside, ignore_errors=True)


def restore(dest: Path) -> None:
    """Undo a publish cut short: the older directory, left aside with no `dest`, goes back into place; one
    left aside beside a `dest` (cut after the second rename) is removed."""
    aside = _aside(dest)
    if not aside.exists():
        return
    if dest.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, dest)


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.replaced")


def write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))

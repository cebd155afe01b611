"""The load check: the test suite with a CPU hog beside it, to shake out tests that pass only with the usual
timing (a test that polls a run and then acts on it, two processes racing for a lease, a timeout sized for
an idle machine). Every tier by default: a quick-tier test of two scripts racing each other failed on a
fresh clone once.

    python tests/load_check.py                 # once: one busy process per core at nice 19, beside the suite
    python tests/load_check.py --runs 3 --logs load-logs
    python tests/load_check.py --slow          # the slow tiers (e2e, ray, tune) only
    python tests/load_check.py --nice 0 -- -k ray_cluster    # harder load; extra pytest arguments after --

The hogs run at the lowest priority (nice 19) by default: Ray runs its worker processes (the training itself)
at nice 15, so a hog at nice 10 would take three quarters of a core from them, not take what is idle. The
hogs start before pytest and are stopped when it ends (also on Ctrl-C). Each run prints one line: its
exit code, its wall time and pytest's summary; the script exits non-zero if any run failed. CI does not run
this (it runs the README's test command); run it before relying on a change to a test that watches a run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOW_TIERS = ["-m", "e2e or ray"]  # the tune tier's tests are marked ray too


def hogs(count: int, nice: int) -> list[subprocess.Popen]:
    """`count` processes that each keep a core busy at `nice`, in their own process group."""
    spin = "while True: pass"
    return [
        subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", spin], start_new_session=True)
        for _ in range(count)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_once(n: int, args: argparse.Namespace) -> tuple[int, float, str]:
    log = Path(args.logs) / f"load-check-{n}.log" if args.logs else None
    tiers = SLOW_TIERS if args.slow else []
    cmd = [sys.executable, "-m", "pytest", *tiers, "-p", "no:cacheprovider", *args.pytest_args]
    busy = hogs(args.hogs, args.nice)
    start = time.monotonic()
    try:
        with open(log, "w") if log else open(os.devnull, "w") as out:
            # the Ray jobs' entrypoints run `dsum` from PATH, as in the activated environment the README uses
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail: list[str] = []
            for line in proc.stdout:
                out.write(line)
                if args.verbose:
                    sys.stdout.write(line)
                tail = (tail + [line])[-60:]
            code = proc.wait()
    finally:
        stop(busy)
    elapsed = time.monotonic() - start
    summary = next((line.strip("= \n") for line in reversed(tail) if re.search(r"\d+ (passed|failed)", line)), "")
    failed = [line.strip() for line in tail if line.startswith("FAILED ")]
    return code, elapsed, "; ".join([summary, *failed])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="how many times to run the suite")
    parser.add_argument("--slow", action="store_true", help="the slow tiers only (e2e, ray, tune)")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy processes (default: one a core)")
    parser.add_argument(
        "--nice", type=int, default=19, help="their niceness (19: lowest priority; Ray's workers run at 15)"
    )
    parser.add_argument("--logs", help="keep each run's pytest output in this directory")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output as it comes")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
    failures = 0
    for n in range(1, args.runs + 1):
        code, elapsed, summary = run_once(n, args)
        failures += code != 0
        print(f"load-check run {n}/{args.runs} ({args.hogs} hogs at nice {args.nice}): exit {code} after "
              f"{elapsed:.0f} s: {summary}", flush=True)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

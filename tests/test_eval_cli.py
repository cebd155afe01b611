"""`dsum eval` and `dsum summarize` through the real CLI on a trained tiny run."""

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dsum, dsum_here, wait_for, write_jsonl
from judge_server import JudgeServer

pytestmark = pytest.mark.e2e

# Real-format dialogues (#PersonN# speakers, three references each), written for this test.
DIALOGUES = [
    (
        "#Person1#: Could you lend me 20 euros?\n#Person2#: What happened?\n#Person1#: I left my wallet at home.\n#Person2#: Sure, here you go.",
        [
            "#Person2# lends #Person1# 20 euros.",
            "#Person1# forgot the wallet and borrows money from #Person2#.",
            "#Person1# borrows 20 euros from #Person2#.",
        ],
    ),
    (
        "#Person1#: The printer is jammed again.\n#Person2#: Did you open the back panel?\n#Person1#: Not yet.\n#Person2#: Try that first, then call IT.",
        [
            "#Person2# tells #Person1# how to fix the jammed printer.",
            "#Person1#'s printer is jammed; #Person2# suggests the back panel.",
            "#Person2# advises #Person1# to open the panel and call IT.",
        ],
    ),
    (
        "#Person1#: Are we still on for dinner on Friday?\n#Person2#: Yes, at the Thai place.\n#Person1#: Seven o'clock?\n#Person2#: Perfect.",
        [
            "#Person1# and #Person2# will have dinner at the Thai place on Friday at seven.",
            "#Person1# and #Person2# confirm Friday dinner.",
            "They will eat Thai food on Friday at 7.",
        ],
    ),
    (
        "#Person1#: I'd like to return these shoes.\n#Person2#: Do you have the receipt?\n#Person1#: Yes, here it is.\n#Person2#: I'll refund your card.",
        [
            "#Person1# returns shoes and #Person2# refunds the card.",
            "#Person2# refunds #Person1# for the shoes.",
            "#Person1# gets a refund for the shoes.",
        ],
    ),
]


@pytest.fixture(scope="module")
def trained_run(default_run):
    cwd, result = default_run
    return cwd, Path(result["run_dir"])


def test_eval_local_file_with_three_references_and_judge(trained_run, tmp_path, monkeypatch):
    cwd, run = trained_run
    own = {p.name: p.read_bytes() for p in (run / "eval" / "test").iterdir()}  # what results.json points to
    data = write_jsonl(
        tmp_path / "real.jsonl",
        [
            {"id": i, "dialogue": d, "summary1": r[0], "summary2": r[1], "summary3": r[2]}
            for i, (d, r) in enumerate(DIALOGUES)
        ],
    )
    good = '{"relevance": 2, "coherence": 3, "consistency": 2, "fluency": 4}'
    with JudgeServer(["no scores here", good] + [good] * 7) as server:
        monkeypatch.setenv("DSUM_JUDGE_BASE_URL", server.base_url)
        proc = dsum_here(
            "eval",
            "--run",
            run / "final",
            "--data",
            data,
            "data.columns.summary=[summary1,summary2,summary3]",
            "eval.judge.backoff=0",
            "--json",
            cwd=cwd,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    out = run / "eval" / "file-real"  # an evaluation of its own, beside the run's eval/test/
    assert {p.name: p.read_bytes() for p in (run / "eval" / "test").iterdir()} == own
    assert result["examples"] == 4 and result["report"] == str(out / "report.md")
    assert (out / "scores_boxplot.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert (
        "| rougeL |" in report
        and "95% CI" in report
        and "## LLM judge (1-5)" in report
        and "## Worst examples" in report
    )
    assert report.count("| reference 3 |") >= 3  # the three references appear beside each shown example
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["references"]) == 3 and "base" in p and "tuned" in p for p in preds)
    assert preds[0]["judge"]["attempts"] == 2  # the malformed first answer was retried
    assert result["judge"]["tuned"]["judge_fluency"] == 4.0 and result["judge"]["tuned"]["judge_failed"] == 0
    m = result["metrics"]["rougeL"]
    assert m["ci_low"] <= m["delta"] <= m["ci_high"]


def _kept(path: Path) -> list[dict]:
    """The finished batches in an evaluation's generated.jsonl (its header and a line being written left out)."""
    lines = path.read_text().split("\n")[1:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def test_a_killed_evaluation_run_again_generates_only_what_it_lacks(trained_run, tmp_path):
    """`dsum eval` is SIGKILLed after a few of its 18 batches (9 per model, eval.batch_size=4); the same command
    continues in the same folder: it keeps what was generated, generates the rest, and its predictions hold
    each row once, the same as the run's own one-process evaluation (eval.batch_size 16)."""
    _, trained = trained_run
    run = tmp_path / "run"  # (a copy: the shared run's eval/ stays as other tests expect it)
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("eval"))
    args = [sys.executable, "-m", "dsum.cli", "eval", "--run", str(run), "eval.batch_size=4", "--json"]
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    partial = run / "eval/split-test/generated.jsonl"
    wait_for(lambda: len(_kept(partial)) >= 3, 300, "three batches generated", proc, every=0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    kept = _kept(partial)
    assert 3 <= len(kept) < 18 and not (run / "eval/split-test/eval.json").exists(), "killed before its end"

    again = dsum("eval", "--run", run, "eval.batch_size=4", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"evaluating: {len(kept)} of 18 batches already generated, kept; generating the rest" in again.stderr
    result = json.loads(again.stdout)
    assert result["predictions"] == str(run / "eval/split-test/predictions.jsonl"), "continued in its folder"
    assert not partial.exists() and sorted(p.name for p in (run / "eval").iterdir()) == ["split-test"]
    preds = [json.loads(x) for x in Path(result["predictions"]).read_text().splitlines()]
    own = [json.loads(x) for x in (trained / "eval/test/predictions.jsonl").read_text().splitlines()]
    assert [p["dialogue"] for p in preds] == [p["dialogue"] for p in own] and len(preds) == 36, "each row once"
    for batch in kept:  # what was kept before the kill is what the predictions hold
        assert [preds[i][batch["kind"]] for i in batch["positions"]] == batch["outputs"]
    assert [(p["base"], p["tuned"]) for p in preds] == [(p["base"], p["tuned"]) for p in own]


def test_eval_bad_file_is_one_line(trained_run, tmp_path):
    cwd, run = trained_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"dialogue": "A: hi", "summary": ""}])
    proc = dsum("eval", "--run", run, "--data", bad, cwd=cwd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}: no usable rows (first problem: {bad}: row 1: 'summary' is empty)" in proc.stderr.splitlines()[-1]


def test_summarize_from_stdin(trained_run, monkeypatch):
    cwd, run = trained_run
    text = "Ann: Can you pick up the keys?\nBo: Sure, where?\nAnn: At the gym.\n\n#Person1#: Tennis on Friday?\n#Person2#: Yes, at six.\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))  # what the CLI reads when no file is given
    proc = dsum_here("summarize", "--model", run, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = json.loads(proc.stdout)["summaries"]
    assert len(summaries) == 2 and all(isinstance(s, str) and s for s in summaries)

"""rundir's publishing, cut at every point by a real SIGKILL of the process doing it: a reader finds the old
complete weights or the new complete ones, never none and never a mix."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dsum import rundir

# A publish of new weights over old ones, in a child that kills itself (SIGKILL: no cleanup runs) right after
# the os.replace numbered KILL_AFTER.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from dsum import rundir

    kill_after, calls, real = int(sys.argv[2]), [], os.replace

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    with rundir.staged(Path(sys.argv[1]) / rundir.FINAL) as partial:
        (partial / "weights").write_text("new")
        (partial / "tokenizer").write_text("new")
    """
)


def _run(tmp_path):
    run = tmp_path / "run"
    (run / rundir.FINAL).mkdir(parents=True)
    (run / rundir.CONFIG).write_text("name: run\n")
    for name in ("weights", "tokenizer"):
        (run / rundir.FINAL / name).write_text("old")
    return run


def _read(run) -> set[str]:
    final = rundir.find(run).final
    return {(final / name).read_text() for name in ("weights", "tokenizer")}


@pytest.mark.parametrize("kill_after, expected", [(1, "old"), (2, "new")],
                         ids=["between the two renames", "after the new one is in place"])  # fmt: skip
def test_a_publish_killed_at_any_point_leaves_the_old_or_the_new_weights(tmp_path, kill_after, expected):
    run = _run(tmp_path)
    done = subprocess.run([sys.executable, "-c", CHILD, str(run), str(kill_after)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    if kill_after == 1:
        assert not (run / rundir.FINAL).exists()  # the cut this guards: the old weights aside, the new not in place
    assert _read(run) == {expected}
    left = {rundir.CONFIG, rundir.FINAL} | ({f".{rundir.FINAL}.partial"} if kill_after == 1 else set())
    assert set(os.listdir(run)) == left  # (the next publish clears a partial one)
    # and the next publish goes through
    with rundir.staged(run / rundir.FINAL) as partial:
        for name in ("weights", "tokenizer"):
            (partial / name).write_text("newer")
    assert _read(run) == {"newer"} and sorted(os.listdir(run)) == [rundir.CONFIG, rundir.FINAL]


def test_a_publish_that_fails_while_filling_keeps_the_old_weights(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(OSError), rundir.staged(run / rundir.FINAL) as partial:
        (partial / "weights").write_text("new")
        raise OSError(28, "No space left on device")
    assert _read(run) == {"old"} and sorted(os.listdir(run)) == [rundir.CONFIG, rundir.FINAL]

"""The bad-input suite: mistakes a user can make, through the real CLI (main() in this process), across job
files, config values, data files and rows, models, checkpoints, cluster and tracking settings, and every
subcommand. Each must end with exit 2 and exactly one line, `dsum: error: ...`, that names the file, the
field or the row; no traceback; and nothing written where the command runs (no run directory, no store).

Then property tests (hypothesis): random and mutated configs and data files never get anything but a
one-line DsumError out of the loaders — never a traceback, never a hang.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import ray
from conftest import JOBS, MINILM, dsum_here
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsum import config, data
from dsum.errors import DsumError

JOB = str(JOBS / "tiny-dialogsum.yaml")
T5 = str(JOBS / "tiny-dialogsum-t5.yaml")
CLASSIFY = str(JOBS / "tiny-reviews-classify.yaml")
DOCS = str(JOBS / "tiny-documents.yaml")
GOOD_ROW = {"dialogue": "Ann: Lunch at noon?\nBo: Yes, at the cafe.", "summary": "Ann and Bo meet for lunch."}


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEAD = f"127.0.0.1:{_dead_port()}"


def _inputs(root: Path) -> None:
    """The bad files the cases point at ({in}/...)."""
    root.mkdir()
    (root / "not-yaml.yaml").write_text("model: [unclosed\n")
    (root / "list.yaml").write_text("- model\n- data\n")
    (root / "empty.jsonl").write_text("")
    (root / "bad-json.jsonl").write_text(json.dumps(GOOD_ROW) + "\n{not json\n")
    (root / "empty-summary.jsonl").write_text(json.dumps(GOOD_ROW | {"summary": ""}) + "\n")
    (root / "number-dialogue.jsonl").write_text(json.dumps(GOOD_ROW | {"dialogue": 42}) + "\n")
    (root / "undecodable.jsonl").write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + b'{"dialogue": "\xff\xfe"}\n')
    (root / "no-summary-column.jsonl").write_text(json.dumps({"dialogue": "A: hi"}) + "\n")
    (root / "no-summary-column.csv").write_text("dialogue,text\nhi,there\n")
    (root / "dialogues.txt").write_text("A: hi\n")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "weights.bin").write_bytes(b"\0" * 16)
    (root / "not-a-checkpoint").mkdir()
    (root / "a-file").write_text("x")
    (root / "stdin-bad.jsonl").write_text('{"text": "no dialogue field"}\n')
    (root / "blank.txt").write_text("\n\n")
    (root / "job-with-typo.yaml").write_text("trian:\n  max_steps: 10\n")
    (root / "job-bad-type.yaml").write_text("train:\n  max_steps: ten\n")
    (root / "finished-run" / "final").mkdir(parents=True)  # what `dsum eval` reads first
    (root / "finished-run" / "config.yaml").write_text(Path(DOCS).read_text())
    (root / "a-decoder").mkdir()
    (root / "a-decoder" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
    )


# (id, argv with {in} for the inputs folder, what the one line must say)
CASES: list[tuple[str, list[str], str]] = [
    # job files
    ("no such job file", ["validate", "{in}/nope.yaml"], "nope.yaml: no such job file"),
    ("job path is a directory (validate)", ["validate", "{in}"], "a directory, not a job file"),
    ("job path is a directory (train)", ["train", "{in}", "--dry-run"], "a directory, not a job file"),
    ("job path is a directory (tune)", ["tune", "{in}"], "a directory, not a job file"),
    ("job path is a directory (render)", ["k8s", "render", "{in}"], "a directory, not a job file"),
    ("not YAML", ["validate", "{in}/not-yaml.yaml"], "not-yaml.yaml: not valid YAML"),
    ("YAML list, not a mapping", ["validate", "{in}/list.yaml"], "list.yaml: a job is a mapping of sections"),
    ("unknown section", ["validate", "{in}/job-with-typo.yaml"], "trian"),
    ("wrong type in the file", ["validate", "{in}/job-bad-type.yaml"], "train.max_steps"),
    # config values (overrides)
    ("unknown key", ["validate", JOB, "train.lerning_rate=1e-3"], "train.lerning_rate"),
    ("unknown section key", ["validate", JOB, "trainn.max_steps=3"], "trainn"),
    ("not a number", ["validate", JOB, "train.learning_rate=fast"], "train.learning_rate"),
    ("negative learning rate", ["validate", JOB, "train.learning_rate=-1"], "train.learning_rate"),
    ("steps and epochs", ["validate", JOB, "train.epochs=2"], "exactly one of max_steps and epochs"),
    ("warmup past the end", ["validate", JOB, "train.max_steps=10"], "warmup_steps (20) must be below max_steps"),
    ("batch not divisible", ["validate", JOB, "train.global_batch_size=12"], "train.global_batch_size"),
    ("qlora without 4 bits", ["validate", JOB, "method.name=qlora"], "method"),
    ("bad method", ["validate", JOB, "method.name=prefix"], "method.name"),
    ("zero rank", ["validate", JOB, "method.r=0"], "method.r"),
    ("dropout of 1", ["validate", JOB, "method.dropout=1"], "method.dropout"),
    ("run name escapes", ["validate", JOB, "train.run_name=../../tmp/x"], "train.run_name: '../../tmp/x' is not a plain"),
    ("run name with a slash", ["validate", JOB, "train.run_name=a/b"], "train.run_name"),
    ("preset of another task", ["validate", JOB, "model.name=tiny-t5"], "model.task=seq2seq"),
    ("heads don't divide", ["validate", JOB, "model.tiny.num_heads=3"], "divisible by num_heads"),
    ("zero source length", ["validate", JOB, "data.max_source_length=0"], "data.max_source_length"),
    ("top_p above 1", ["validate", JOB, "eval.top_p=2"], "eval.top_p"),
    ("bad precision", ["validate", JOB, "train.precision=fp8"], "train.precision"),
    ("bad strategy", ["validate", JOB, "scaling.strategy=fsdp"], "scaling.strategy"),
    ("zero workers", ["validate", JOB, "scaling.num_workers=0"], "scaling.num_workers"),
    ("bad optimizer", ["train", JOB, "train.optimizer=adam", "--dry-run"], "train.optimizer"),
    ("rouge for a classifier", ["validate", CLASSIFY, "train.eval_rouge_samples=4"], "eval_rouge_samples"),
    # sweeps
    ("sweep without evaluations", ["tune", JOB], "train.eval_steps, which is not set"),
    ("no trials", ["tune", JOB, "train.eval_steps=10", "tune.num_samples=0"], "tune.num_samples"),
    ("unknown key in the space", ["tune", JOB, "train.eval_steps=10", "tune.space={method.rank: {choice: [4]}}"], "method.rank"),
    ("empty range", ["tune", JOB, "train.eval_steps=10", "tune.space={train.learning_rate: {uniform: [1, 1]}}"], "train.learning_rate"),
    ("loguniform from 0", ["tune", JOB, "train.eval_steps=10", "tune.space={train.learning_rate: {loguniform: [0, 1]}}"], "loguniform"),
    ("a metric never reported", ["tune", JOB, "train.eval_steps=10", "tune.metric=eval_rougeL"], "eval_rouge_samples"),
    ("a sampled job that is invalid", ["tune", JOB, "train.eval_steps=10", "tune.space={method.r: {choice: [0, 8]}}"], "method.r"),
    # data files and rows
    ("data file missing", ["train", JOB, "data.source={in}/nope.jsonl"], "nope.jsonl"),
    ("data file empty", ["train", JOB, "data.source={in}/empty.jsonl"], "empty.jsonl"),
    ("invalid JSON row", ["train", JOB, "data.source={in}/bad-json.jsonl", "data.strict=true"], "bad-json.jsonl: row 2"),
    ("empty summary", ["train", JOB, "data.source={in}/empty-summary.jsonl", "data.strict=true"], "empty-summary.jsonl: row 1"),
    ("dialogue not text", ["train", JOB, "data.source={in}/number-dialogue.jsonl", "data.strict=true"], "number-dialogue.jsonl: row 1"),
    ("undecodable bytes", ["train", JOB, "data.source={in}/undecodable.jsonl", "data.strict=true"], "undecodable.jsonl: row 2"),
    ("no summary column", ["train", JOB, "data.source={in}/no-summary-column.jsonl", "data.strict=true"], "summary"),
    ("no summary column (csv)", ["train", JOB, "data.source={in}/no-summary-column.csv", "data.strict=true"], "summary"),
    ("unsupported file type", ["train", JOB, "data.source={in}/dialogues.txt"], "dialogues.txt"),
    ("a split file missing", ["train", JOB, "data.files={train: {in}/nope.jsonl}"], "nope.jsonl"),
    # models and checkpoints
    ("model dir that is no model", ["train", JOB, "model.name={in}/not-a-model"], "model.name: '{in}/not-a-model' is not a model"),
    ("model dir that is no model (dry run)", ["train", JOB, "model.name={in}/not-a-model", "--dry-run"], "is not a model"),
    ("hub model not reachable", ["train", JOB, "model.name=org/not-a-model"], "model.name"),
    ("target module not in the model", ["train", JOB, "method.target_modules=[query_key_value]"], "query_key_value not found in the model"),
    ("t5 target module not in the model", ["train", T5, "method.target_modules=[c_attn]"], "c_attn not found"),
    ("checkpoint dir missing", ["train", JOB, "train.resume_from={in}/nope"], "train.resume_from"),
    ("checkpoint dir that is no checkpoint", ["train", JOB, "train.resume_from={in}/not-a-checkpoint"], "train.resume_from"),
    ("checkpoint that is a file", ["train", JOB, "train.resume_from={in}/a-file"], "train.resume_from"),
    ("output dir that can't be made", ["train", JOB, "train.output_dir=/proc/dsum-runs"], "train.output_dir: can't create"),
    # evaluation encoders (BERTScore's, the similarity one)
    ("bertscore encoder missing", ["train", DOCS, "eval.bertscore.model={in}/nope"], "eval.bertscore.model: {in}/nope: no such directory"),
    ("bertscore encoder is no model", ["train", DOCS, "eval.bertscore.model={in}/not-a-model"], "not a model directory (no config.json)"),
    ("bertscore encoder is a decoder", ["train", DOCS, "eval.bertscore.model={in}/a-decoder"], "a LlamaForCausalLM, not an encoder"),
    ("bertscore layer beyond the encoder", ["train", DOCS, f"eval.bertscore.model={MINILM}", "eval.bertscore.layer=9"], "eval.bertscore.layer: 9 is beyond the encoder's 6 layers"),
    ("bertscore for a classifier", ["validate", CLASSIFY, "eval.bertscore.model=x"], "eval.bertscore"),
    ("similarity encoder missing", ["train", JOB, "eval.similarity_model={in}/nope"], "eval.similarity_model: {in}/nope: no such"),
    ("eval: bertscore encoder missing", ["eval", "--run", "{in}/finished-run", "eval.bertscore.model={in}/nope"], "eval.bertscore.model"),
    # cluster settings (capacity is in test_ray_cluster.py: it needs a cluster)
    ("dead address (train)", ["train", JOB, "--address", DEAD], f"--address {DEAD}: no Ray cluster answers there"),
    ("dead address (tune)", ["tune", JOB, "train.eval_steps=10", "--address", DEAD], "no Ray cluster answers there"),
    ("address without a port number", ["train", JOB, "--address", "127.0.0.1:port"], "--address 127.0.0.1:port"),
    # tracking servers
    ("tracking server down (train)", ["train", JOB, f"tracking.tracking_uri=http://{DEAD}", "tracking.retries=0"], "tracking.tracking_uri: cannot reach MLflow"),
    ("tracking server down (tune)", ["tune", JOB, "train.eval_steps=10", f"tracking.tracking_uri=http://{DEAD}", "tracking.retries=0"], "cannot reach MLflow"),
    ("promote against a dead server", ["promote", "--model", "m", "--candidate", "1", "--tracking-uri", f"http://{DEAD}", "--retries", "0"], "--tracking-uri: cannot reach MLflow"),
    ("rollback against a dead server", ["rollback", "--model", "m", "--tracking-uri", f"http://{DEAD}", "--retries", "0"], "--tracking-uri: cannot reach MLflow"),
    # the other subcommands
    ("eval of a folder that is no run", ["eval", "--run", "{in}/not-a-checkpoint"], "not a finished dsum run"),
    ("eval of a missing run", ["eval", "--run", "{in}/nope"], "not a finished dsum run"),
    ("summarize with no run", ["summarize", "--model", "{in}/nope", "{in}/blank.txt"], "not a finished dsum run"),
    ("merge of a folder that is no run", ["merge", "{in}/not-a-checkpoint"], "not a dsum run directory"),
    ("render: schedule not cron", ["k8s", "render", JOB, "--schedule", "nightly"], "--schedule: 'nightly' is not a cron schedule"),
    ("render: schedule too often", ["k8s", "render", JOB, "--schedule", "*/10 * * * *"], "fires more than once a day"),
    ("render: a sweep without evaluations", ["k8s", "render", JOB, "--sweep"], "train.eval_steps, which is not set"),
    ("render: bad override", ["k8s", "render", JOB, "scaling.use_gpu=maybe"], "scaling.use_gpu"),
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "in"
    _inputs(root)
    return root


def _args(argv: list[str], inputs: Path) -> list[str]:
    return [a.replace("{in}", str(inputs)) for a in argv]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, inputs, tmp_path):
    _, argv, says = next(c for c in CASES if c[0] == case)
    work = tmp_path / "work"
    work.mkdir()
    proc = dsum_here(*_args(argv, inputs), cwd=work)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dsum: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert says.replace("{in}", str(inputs)) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert list(work.iterdir()) == [], "nothing is written where the command runs"
    assert not ray.is_initialized(), "no mistake gets as far as starting Ray"


def test_the_suite_counts_its_cases(capsys):
    with capsys.disabled():
        print(f"\nbad-input suite: {len(CASES)} cases through the CLI, each one line and exit 2")
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------- properties

SECTIONS = sorted(config.JobConfig.model_fields)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)  # fmt: skip


@st.composite
def _mutated_jobs(draw):
    """The default job with random values put at random (existing or made-up) keys."""
    raw = config.load(JOB).to_dict()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*SECTIONS, "bogus"]))
        node = raw.setdefault(section, {}) if isinstance(raw.get(section, {}), dict) else raw
        keys = list(node) if isinstance(node, dict) and node else ["x"]
        key = draw(st.sampled_from([*keys, "made_up"]))
        node[key] = draw(_values)
    return raw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_jobs())
def test_config_loader_never_raises_anything_but_a_config_error(raw):
    try:
        config.from_dict(raw, source="job.yaml")
    except config.ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("job.yaml: ")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_yaml_job_files_of_random_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_bytes(content)
    try:
        config.load(path)
    except config.ConfigError as e:
        assert "\n" not in str(e)


_rows = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["dialogue", "summary", "text", "label"]), _values, max_size=3),
        _values,
    ),
    max_size=6,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, junk=st.binary(max_size=40), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_data_loader_on_random_rows_and_bytes(tmp_path, rows, junk, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"dialogue,summary\n" + junk)
    else:
        text = "\n".join(json.dumps(r) for r in rows) if suffix == ".jsonl" else json.dumps(rows)
        path.write_bytes(text.encode() + junk)
    cfg = config.load(JOB).data
    for strict in (False, True):
        try:
            ds, _ = data.load_file(cfg.model_copy(update={"strict": strict}), str(path), "causal")
            assert len(ds) >= 1
        except DsumError as e:
            assert "\n" not in str(e) and str(path) in str(e)

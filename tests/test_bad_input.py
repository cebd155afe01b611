"""The bad-input suite: mistakes a user can make, through the real CLI (main() in this process), across job
files, config values, data files and rows, models, checkpoints, cluster and tracking settings, and every
subcommand. Each must end with exit 2 and exactly one line, `dsum: error: ...`, that names the file, the
field or the row; no traceback; and nothing written where the command runs (no run directory, no store).

Then property tests (hypothesis): random and mutated configs and data files never get anything but a
one-line DsumError out of the loaders — never a traceback, never a hang.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import JOBS, MINILM, dsum_here
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dsum import config, data
from dsum.deploy import rules
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
    table = pa.table({"dialogue": [GOOD_ROW["dialogue"]] * 8, "summary": [GOOD_ROW["summary"]] * 8})
    pq.write_table(table, root / "good.parquet")
    good = (root / "good.parquet").read_bytes()
    (root / "text.parquet").write_text(json.dumps(GOOD_ROW) + "\n")
    (root / "cut.parquet").write_bytes(good[: len(good) // 2])
    (root / "damaged.parquet").write_bytes(good[:8] + b"\xab" * 192 + good[200:])
    (root / "zip.parquet").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    (root / "parquet.jsonl").write_bytes(good)
    (root / "gzip.csv").write_bytes(gzip.compress(b"dialogue,summary\nhi,there\n"))
    (root / "binary.json").write_bytes(b"\x00\x01\x02" * 20)
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
    ("warmup past the end", ["validate", JOB, "train.max_steps=10", "train.warmup_ratio=0", "train.warmup_steps=20"],
     "warmup_steps (20) must be below max_steps (10)"),
    ("two warmups", ["validate", JOB, "train.warmup_steps=20"], "can't set both warmup_steps (20) and warmup_ratio (0.04)"),
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
    ("sweep evaluating past its end", ["tune", JOB, "train.max_steps=30", "train.eval_steps=40"], "train.eval_steps (40) is past train.max_steps (30)"),
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
    ("eval of no run and no model", ["eval", "--split", "test"], "one of the arguments --run --model is required"),
    ("eval of a run and a model", ["eval", "--run", "{in}/nope", "--model", "models:/m@champion"], "argument --model: not allowed with argument --run"),
    ("summarize a model URI that is no model URI", ["summarize", "--model", "models:/m", "{in}/blank.txt"], "a registered model is models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("summarize with no run", ["summarize", "--model", "{in}/nope", "{in}/blank.txt"], "not a finished dsum run"),
    ("merge of a folder that is no run", ["merge", "{in}/not-a-checkpoint"], "not a dsum run directory"),
    ("render: schedule not cron", ["k8s", "render", JOB, "--schedule", "nightly"], "--schedule 'nightly': not a cron schedule"),
    ("render: schedule too often", ["k8s", "render", JOB, "--schedule", "*/10 * * * *"], "fires more than once a day"),
    ("render: a sweep evaluating past its end", ["k8s", "render", JOB, "train.max_steps=30", "train.eval_steps=40", "--sweep"], "train.eval_steps (40) is past train.max_steps (30)"),
    ("render: bad override", ["k8s", "render", JOB, "scaling.use_gpu=maybe"], "scaling.use_gpu"),
    # sweep spaces whose values have the wrong type for their key
    ("space: words for a number", ["tune", JOB, "train.eval_steps=10", "tune.space={train.learning_rate: {choice: [fast, slow]}}"], "tune.space.train.learning_rate: choice 'fast': Input should be a valid number"),
    ("space: words for an integer", ["tune", JOB, "train.eval_steps=10", "tune.space={method.r: {choice: ['4', eight]}}"], "tune.space.method.r: choice 'eight': Input should be a valid integer"),
    ("space: fractions for an integer", ["tune", JOB, "train.eval_steps=10", "tune.space={method.r: {uniform: [4, 32]}}"], "tune.space.method.r: uniform draws fractional numbers and method.r takes integers: use randint or choice"),
    ("space: log-fractions for an integer", ["tune", JOB, "train.eval_steps=10", "tune.space={train.eval_steps: {loguniform: [1, 10]}}"], "loguniform draws fractional numbers and train.eval_steps takes integers"),
    ("space: numbers for a name", ["tune", JOB, "train.eval_steps=10", "tune.space={train.lr_scheduler: {randint: [1, 3]}}"], "randint draws integers and train.lr_scheduler takes one of 'linear'"),
    ("space: numbers for a switch", ["tune", JOB, "train.eval_steps=10", "tune.space={train.gradient_checkpointing: {uniform: [0, 1]}}"], "takes true or false: use choice"),
    ("space: a number for a list", ["tune", JOB, "train.eval_steps=10", "tune.space={method.target_modules: {choice: [[q_proj], 3]}}"], "tune.space.method.target_modules: choice 3"),
    # dsum k8s render's options, by Kubernetes' own rules (dsum/deploy/rules.py)
    ("render: namespace in capitals", ["k8s", "render", JOB, "--namespace", "Prod"], "--namespace 'Prod': not a namespace name"),
    ("render: namespace with an underscore", ["k8s", "render", JOB, "--namespace", "ml_team"], "--namespace 'ml_team'"),
    ("render: namespace too long", ["k8s", "render", JOB, "--namespace", "n" * 64], "longer than 63 characters"),
    ("render: image in capitals", ["k8s", "render", JOB, "--image", "Dsum:1"], "--image 'Dsum:1': is not an image reference"),
    ("render: image with an empty tag", ["k8s", "render", JOB, "--image", "ghcr.io/org/dsum:"], "is not an image reference"),
    ("render: image with a space", ["k8s", "render", JOB, "--image", "dsum:1 "], "must not be empty or have spaces"),
    ("render: memory with a space", ["k8s", "render", JOB, "--worker-memory", "4 Gi"], "--worker-memory '4 Gi': not a Kubernetes quantity"),
    ("render: memory in GB", ["k8s", "render", JOB, "--worker-memory", "16GB"], "not a Kubernetes quantity"),
    ("render: memory too small", ["k8s", "render", JOB, "--worker-memory", "512Mi"], "less than 1Gi"),
    ("render: negative memory", ["k8s", "render", JOB, "--worker-memory=-4Gi"], "less than 1Gi"),
    ("render: no trials at once", ["k8s", "render", JOB, "train.eval_steps=10", "--sweep", "--trials-at-once", "0"], "--trials-at-once 0: must be at least 1"),
    ("render: trials not a number", ["k8s", "render", JOB, "--trials-at-once", "two"], "argument --trials-at-once: invalid int value: 'two'"),
    ("render: no deadline", ["k8s", "render", JOB, "--deadline-hours", "0"], "--deadline-hours 0.0: must be a positive number"),
    ("render: deadline not a number", ["k8s", "render", JOB, "--deadline-hours", "nan"], "--deadline-hours nan"),
    ("render: unknown time zone", ["k8s", "render", JOB, "--schedule", "0 3 * * *", "--time-zone", "Mars/Olympus"], "--time-zone 'Mars/Olympus': not an IANA time zone"),
    ("render: local time zone", ["k8s", "render", JOB, "--schedule", "0 3 * * *", "--time-zone", "Local"], "'Local' is not allowed"),
    ("render: time zone as a path", ["k8s", "render", JOB, "--schedule", "0 3 * * *", "--time-zone", "../etc/passwd"], "not an IANA time zone"),
    ("render: hour out of range", ["k8s", "render", JOB, "--schedule", "0 25 * * *"], "--schedule '0 25 * * *': hour field '25': 25 is outside 0-23"),
    ("render: month out of range", ["k8s", "render", JOB, "--schedule", "0 3 1 13 *"], "month field '13'"),
    ("render: weekday name unknown", ["k8s", "render", JOB, "--schedule", "0 3 * * mo"], "day of week field 'mo'"),
    ("render: zero step", ["k8s", "render", JOB, "--schedule", "0 3 */0 * *"], "step '0' is not a positive number"),
    ("render: zone in the schedule", ["k8s", "render", JOB, "--schedule", "CRON_TZ=UTC 0 3 * * *"], "use --time-zone"),
    ("render: unknown scheduler", ["k8s", "render", JOB, "--via", "argo"], "argument --via: invalid choice: 'argo'"),
    ("render: empty queue", ["k8s", "render", JOB, "--queue", ""], "--queue '': not a Kueue queue name: must not be empty"),
    ("render: queue with a space", ["k8s", "render", JOB, "--queue", "team a"], "--queue 'team a': not a Kueue queue name"),
    ("render: queue of a RayCronJob", ["k8s", "render", JOB, "train.eval_steps=10", "--schedule", "0 3 * * *", "--via", "raycronjob", "--queue", "team-a"], "a RayCronJob can't label the RayJobs it creates"),
    ("render: a name with nothing to keep", ["k8s", "render", JOB, "name=___"], "name: '___' has no letter or digit"),
    ("render: a name in another script", ["k8s", "render", JOB, "name=要約"], "has no letter or digit to make Kubernetes names of"),
    ("render: out is a directory", ["k8s", "render", JOB, "--out", "{in}"], "can't write the manifests there (Is a directory)"),
    ("render: out in a missing folder", ["k8s", "render", JOB, "--out", "{in}/nope/x.yaml"], "can't write the manifests there (No such file or directory)"),
    ("render: out where nothing can be written", ["k8s", "render", JOB, "--out", "/proc/dsum.yaml"], "--out /proc/dsum.yaml: can't write"),
    # --address that reaches a service that is not Ray's GCS ({http}, {banner}, {silent}: servers of this module)
    ("address of an HTTP server (train)", ["train", JOB, "--address", "{http}"], "an HTTP server answers there (an HTML page), not Ray's GCS"),
    ("address of an HTTP server (tune)", ["tune", JOB, "train.eval_steps=10", "--address", "{http}"], "not Ray's GCS"),
    ("address of another service", ["train", JOB, "--address", "{banner}"], "something that is not Ray's GCS answers there (it sent b'220 mail.example"),
    ("address of a silent service", ["train", JOB, "--address", "{silent}"], "took the connection but did not answer in 5 s"),
    ("address as a dashboard URL", ["train", JOB, "--address", "http://127.0.0.1:8265"], "that is a dashboard URL"),
    # a storage path (bucket) that can't be reached ({dead}: a closed port; {silent}: a server that never answers)
    ("storage on a closed endpoint", ["train", JOB, "scaling.storage_path=s3://b/x?endpoint_override={dead}&scheme=http"], "scaling.storage_path: s3://b/x?endpoint_override={dead}&scheme=http: can't be reached: When getting information for key 'x'"),
    ("storage that never answers", ["train", JOB, "scaling.storage_path=s3://b/x?endpoint_override={silent}&scheme=http&region=us-east-1"], "no answer in 10 s"),
    ("storage of a kind this machine lacks", ["train", JOB, "scaling.storage_path=hdfs://namenode:9000/dsum"], "can't be reached: Unable to load libjvm"),
    ("storage of an unknown kind", ["tune", JOB, "train.eval_steps=10", "scaling.storage_path=s4://b/x"], "Unrecognized filesystem type in URI: s4://b/x"),
    # data files whose bytes are not what their extension says
    ("parquet that is text", ["train", JOB, "data.source={in}/text.parquet"], "text.parquet: not a readable Parquet file (Could not open Parquet input source"),
    ("parquet cut short", ["train", JOB, "data.source={in}/cut.parquet"], "cut.parquet: not a readable Parquet file"),
    ("parquet with damaged pages", ["train", JOB, "data.source={in}/damaged.parquet"], "damaged.parquet: not a readable Parquet file"),
    ("parquet that is a zip", ["train", JOB, "data.source={in}/zip.parquet"], "zip.parquet: not a readable Parquet file (its bytes are a zip archive's)"),
    ("jsonl that is parquet", ["train", JOB, "data.source={in}/parquet.jsonl"], "parquet.jsonl: not a .jsonl text file: its content is a Parquet file"),
    ("csv that is gzip", ["train", JOB, "data.source={in}/gzip.csv", "data.strict=true"], "gzip.csv: not a .csv text file: its content is gzip-compressed"),
    ("json that is binary", ["train", JOB, "data.files={train: {in}/binary.json}"], "data.files.train: {in}/binary.json: not a .json text file: its content is binary"),
    ("eval file that is parquet", ["eval", "--run", "{in}/finished-run", "--data", "{in}/parquet.jsonl"], "--data: {in}/parquet.jsonl: not a .jsonl text file"),
    # dsum plan --gpu-memory
    ("gpu memory of zero", ["plan", JOB, "--gpu-memory", "0"], "--gpu-memory: '0' is less than 1 MiB"),
    ("gpu memory of zero GiB", ["plan", JOB, "--gpu-memory", "0GiB"], "is less than 1 MiB"),
    ("gpu memory of bytes", ["plan", JOB, "--gpu-memory", "0.0001"], "is less than 1 MiB"),
    ("gpu memory negative", ["plan", JOB, "--gpu-memory=-8GiB"], "'-8GiB' is not a memory size"),
]  # fmt: skip


class _Services:
    """Servers on 127.0.0.1 that are not Ray's GCS, each in a thread: an HTTP server (as Ray's dashboard is
    one), a mail server's greeting, and one that takes connections and never answers."""

    def __init__(self):
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # answers 501 to a PRI request
        self.banner = socket.create_server(("127.0.0.1", 0))
        self.silent = socket.create_server(("127.0.0.1", 0))
        self.stopping = threading.Event()
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._greet, daemon=True).start()

    def _greet(self) -> None:
        self.banner.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.banner.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"220 mail.example ESMTP ready\r\n")

    def placeholders(self) -> dict[str, str]:
        return {
            "{http}": f"127.0.0.1:{self.http.server_port}",
            "{banner}": f"127.0.0.1:{self.banner.getsockname()[1]}",
            "{silent}": f"127.0.0.1:{self.silent.getsockname()[1]}",
            "{dead}": DEAD,
        }

    def close(self) -> None:
        self.stopping.set()
        self.http.shutdown()
        for s in (self.http.socket, self.banner, self.silent):
            s.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input") / "in"
    _inputs(root)
    services = _Services()
    yield {"{in}": str(root), **services.placeholders()}
    services.close()


def _fill_in(text: str, inputs: dict[str, str]) -> str:
    for placeholder, value in inputs.items():
        text = text.replace(placeholder, value)
    return text


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, inputs, tmp_path):
    _, argv, says = next(c for c in CASES if c[0] == case)
    work = tmp_path / "work"
    work.mkdir()
    start = time.monotonic()
    proc = dsum_here(*(_fill_in(a, inputs) for a in argv), cwd=work)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dsum: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert _fill_in(says, inputs) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert list(work.iterdir()) == [], "nothing is written where the command runs"
    assert not ray.is_initialized(), "no mistake gets as far as starting Ray"
    assert time.monotonic() - start < 30, "a mistake is known in seconds"


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


_LEAVES = [key for key, _, _ in config.field_docs() if not key.startswith("tune.")]
_domains = st.one_of(
    st.fixed_dictionaries({"choice": st.lists(_scalars | st.lists(st.text(max_size=6), max_size=2), max_size=3)}),
    st.fixed_dictionaries({st.sampled_from(["uniform", "loguniform", "randint"]): st.lists(_scalars, max_size=3)}),
    st.fixed_dictionaries(
        {
            st.sampled_from(["uniform", "loguniform", "randint"]): st.tuples(
                st.integers(-5, 50), st.integers(-5, 50)
            ).map(list)
        }
    ),
    _values,
)
_GOOD_SPACE = {
    "method.r": [{"choice": [4, 8, "16"]}, {"randint": [2, 17]}],
    "train.learning_rate": [{"loguniform": [1e-5, 1e-2]}, {"choice": ["1e-4", 3e-4]}, {"randint": [1, 3]}],
    "method.dropout": [{"uniform": [0, 0.3]}],
    "train.lr_scheduler": [{"choice": ["linear", "cosine"]}],
    "method.target_modules": [{"choice": [["q_proj", "v_proj"], "all-linear"]}],
}


@st.composite
def _spaces(draw):
    """A space of valid domains, and at most one random one (at a real key or a made-up one)."""
    keys = draw(st.lists(st.sampled_from(sorted(_GOOD_SPACE)), unique=True, max_size=3))
    space = {key: draw(st.sampled_from(_GOOD_SPACE[key])) for key in keys}
    broken = draw(st.none() | st.sampled_from([*_LEAVES, "method.rank", "train", "tune.num_samples"]))
    if broken is not None:
        space[broken] = draw(_domains)
    return space, broken


@settings(max_examples=150, deadline=None)
@given(drawn=_spaces(), pick=st.randoms(use_true_random=False))
def test_sweep_spaces_are_a_sweep_or_one_line(drawn, pick):
    """Search spaces over the job's real keys (and a few that aren't): the job loads and the sweep's check
    passes, or one ConfigError line; a space of valid domains always passes, and a value drawn from a space
    that passed makes a job or one line."""
    from dsum import sweep

    space, broken = drawn
    raw = config.load(JOB).to_dict()
    raw["train"]["eval_steps"] = 10
    raw["tune"]["space"] = space or {"method.r": {"choice": [4]}}
    try:
        job = config.from_dict(raw, source="job.yaml")
        sweep.check(job, "job.yaml")
    except config.ConfigError as e:
        assert broken is not None, f"a space of valid domains was refused: {e}"
        assert "\n" not in str(e) and str(e).startswith("job.yaml: ")
        event("space refused")
        return
    event("space accepted")
    params = {}
    for key, spec in job.tune.space.items():
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            params[key] = pick.choice(arg)
        elif kind == "randint":
            params[key] = pick.randrange(arg[0], arg[1])
        else:
            params[key] = pick.uniform(arg[0], arg[1])
    try:
        trial = sweep.trial_job(job, params, "job.yaml")
    except config.ConfigError as e:  # e.g. a batch size between two that divide the global batch
        assert broken is not None and "\n" not in str(e), e
        return
    if "method.r" in params and "method.alpha" not in params:
        assert trial.method.alpha == 2 * trial.method.r  # tune.alpha_ratio, on the value as the job holds it


_text = st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=20)
_OPTIONS = {  # valid values of each option of `dsum k8s render`
    "namespace": st.none() | st.sampled_from(["dsum", "ml-team", "a" * 63]),
    "image": st.none()
    | st.sampled_from(["ghcr.io/org/dsum:0.1.0-gpu", "localhost:5000/dsum@sha256:" + "a" * 64, "dsum"]),
    "worker_memory": st.none() | st.sampled_from(["16Gi", "64G", "1.5Ti", "2e9", "1Gi"]),
    "time_zone": st.sampled_from(["Etc/UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires", "UTC"]),
    "schedule": st.none() | st.sampled_from(["0 3 * * *", "30 2 * * mon-fri", "15 4 1,15 */2 SUN", "0 0 ? * 1-5/2"]),
    "trials_at_once": st.none() | st.integers(1, 6),
    "deadline_hours": st.sampled_from([0.5, 24.0, 1 / 3600]) | st.floats(0.001, 1e6),
    "queue": st.none() | st.sampled_from(["team-a", "gpu.queue_1"]),
}
_BROKEN = {
    **{key: _text for key in ("namespace", "image", "worker_memory", "time_zone", "schedule", "queue")},
    "trials_at_once": st.integers(-3, 0),
    "deadline_hours": st.floats(max_value=0) | st.sampled_from([float("nan"), float("inf"), 1e-4]),
}


@st.composite
def _options(draw):
    """`dsum k8s render` options: valid values, and at most one option random (or out of range)."""
    broken = draw(st.none() | st.sampled_from(sorted(_BROKEN)))
    values = {key: draw(_BROKEN[key] if key == broken else strategy) for key, strategy in _OPTIONS.items()}
    return values | {"via": draw(st.sampled_from(["cronjob", "raycronjob"]))}, broken


@settings(max_examples=150, deadline=None)
@given(drawn=_options())
def test_render_options_make_valid_manifests_or_one_line(drawn):
    """`dsum k8s render` options: valid ones always render (render checks every KubeRay and pod rule), with
    the values where Kubernetes reads them; any one option broken is one line, before anything is made."""
    from dsum.deploy import k8s

    values, broken = drawn
    if values["queue"] is not None and values["schedule"] is not None and values["via"] == "raycronjob":
        broken = broken or "queue"  # a RayCronJob can't label the RayJobs it makes for Kueue
    job = config.load(JOB, ["train.eval_steps=10"])
    try:
        objs = k8s.render(job, "job.yaml", k8s.Options(sweep=True, **values))
    except DsumError as e:
        assert broken is not None, f"valid options were refused: {e}"
        assert "\n" not in str(e)
        event("options refused")
        return
    event("rendered")
    assert all(o["metadata"].get("namespace") == values["namespace"] for o in objs)
    assert values["namespace"] is None or rules.dns_label(values["namespace"]) is None
    assert values["image"] is None or rules.image(values["image"]) is None
    assert values["worker_memory"] is None or rules.quantity_bytes(values["worker_memory"]) >= 2**30
    assert values["schedule"] is None or rules.cron(values["schedule"]) is None

"""Data: load a source → clean rows → split → fingerprint → prompt → tokenize.

Sources are a hub dataset (through `datasets.load_dataset`), local jsonl/json/csv/parquet files, or a
sample set bundled with dsum. Local text files are read row by row so that a bad row (empty, not a
string, undecodable bytes, invalid JSON) is reported with its row number; in strict mode it is an error.

Rows come out with fixed columns: generation tasks have `dialogue`, `summary` and `references` (every
reference summary, for multi-reference scoring); classification has `text` and `label`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from dsum.config import DataConfig
from dsum.errors import DsumError, one_line

SAMPLE_DIR = Path(__file__).parent / "sample"
BUNDLED = {
    "bundled": SAMPLE_DIR / "dialogues.jsonl",
    "bundled-reviews": SAMPLE_DIR / "reviews.jsonl",
    "bundled-documents": SAMPLE_DIR / "documents.jsonl",  # columns as XSum's: document, summary, id
}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BINARY = {  # what a file whose bytes begin so really is (its own magic number)
    b"PAR1": "a Parquet file",
    b"ARROW1": "an Arrow file",
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"(\xb5/\xfd": "zstd-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"SQLite format 3\x00": "an SQLite database",
}
SPLITS = ("train", "validation", "test")

DEFAULT_CAUSAL_TEMPLATE = "### Instruction:\n{instruction}\n\n### Dialogue:\n{dialogue}\n\n### Summary:\n"
DEFAULT_SEQ2SEQ_TEMPLATE = "{instruction}\n\n{dialogue}\n\nSummary:"
_SLOT = "\x00DIALOGUE\x00"  # stands in for the dialogue while a template is rendered


class DataError(DsumError):
    pass


@dataclass
class SplitReport:
    """What loading did to one split: rows kept, rows skipped and why, and the content hash."""

    source: str
    rows: int = 0
    bad: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "bad_rows": len(self.bad), "fingerprint": self.fingerprint}


# ------------------------------------------------------------------------------------------------ loading


def load_splits(cfg: DataConfig, task: str) -> tuple[DatasetDict, dict[str, SplitReport]]:
    """Load the source, clean every row, split it, and fingerprint each split."""
    raw = _load_raw(cfg)
    classification = task == "classification"
    cleaned: dict[str, Dataset] = {}
    reports: dict[str, SplitReport] = {}
    for split, (where, rows) in raw.items():
        report = SplitReport(source=where)
        kept = [r for r in (_clean(row, i, where, cfg, classification, report) for i, row in rows) if r]
        if not kept:
            raise DataError(f"{where}: no usable rows" + (f" (first problem: {report.bad[0]})" if report.bad else ""))
        cleaned[split] = Dataset.from_list(kept)
        reports[split] = report
    if set(cleaned) != set(SPLITS):
        cleaned, reports = _split(cleaned, reports, cfg)
    for split in SPLITS:
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        if limit is not None and len(cleaned[split]) > limit:
            cleaned[split] = cleaned[split].select(range(limit))
        reports[split].rows = len(cleaned[split])
        reports[split].fingerprint = fingerprint(cleaned[split])
    return DatasetDict(cleaned), reports


def load_file(cfg: DataConfig, path: str, task: str) -> tuple[Dataset, SplitReport]:
    """Every row of one local file (for evaluating on data of the user's own), cleaned as a split is."""
    report = SplitReport(source=path)
    rows = [
        r
        for r in (
            _clean(row, i, path, cfg, task == "classification", report) for i, row in _read_local(Path(path), "--data")
        )
        if r
    ]
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" (first problem: {report.bad[0]})" if report.bad else ""))
    ds = Dataset.from_list(rows)
    report.rows, report.fingerprint = len(ds), fingerprint(ds)
    return ds, report


def _load_raw(cfg: DataConfig) -> dict[str, tuple[str, Any]]:
    """Rows of each split the source has, as (where, iterator of (row number, row))."""
    if cfg.files:
        unknown = set(cfg.files) - set(SPLITS)
        if unknown:
            raise DataError(f"data.files: unknown split {sorted(unknown)[0]!r}; use {', '.join(SPLITS)}")
        return {split: (path, _read_local(Path(path), "data.files." + split)) for split, path in cfg.files.items()}
    if cfg.source in BUNDLED:
        path = BUNDLED[cfg.source]
        return {"all": (str(path), _read_local(path, "data.source"))}
    path = Path(cfg.source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.is_file():
        return {"all": (cfg.source, _read_local(path, "data.source"))}
    return _load_hub(cfg)  # a hub name, or a local directory laid out like a hub dataset


def _load_hub(cfg: DataConfig) -> dict[str, tuple[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.source, revision=cfg.revision)
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        where = "directory" if Path(cfg.source).is_dir() else "from the hub"
        raise DataError(f"data.source: could not load dataset {cfg.source!r} {where}: {one_line(e)}") from None
    names = {"train": cfg.splits.train, "validation": cfg.splits.validation, "test": cfg.splits.test}
    present = {ours: theirs for ours, theirs in names.items() if theirs in ds}
    if "train" not in present:
        raise DataError(f"data.splits.train: {cfg.source} has no split {cfg.splits.train!r} (it has {', '.join(ds)})")
    out = {ours: (f"{cfg.source}[{theirs}]", enumerate(ds[theirs], 1)) for ours, theirs in present.items()}
    if "validation" not in out:  # dsum splits what train holds (see _split)
        out["all"] = out.pop("train")
    return out


def _read_local(path: Path, key: str):
    """Yield (row number, row) from a local file; bad rows are yielded as a reason string."""
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{key}: {path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{key}: {path}: no such file")
    if kind == "parquet":
        return enumerate(_parquet_rows(path, key), 1)
    raw = path.read_bytes()
    _check_text(raw, path, key)
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row doesn't sink the file
    text = raw.decode("utf-8", errors="surrogateescape")
    if kind == "csv":
        return enumerate(csv.DictReader(io.StringIO(text, newline="")), 1)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        return enumerate((_object_or_reason(row) for row in rows), 1)
    return _jsonl_rows(text)


def _parquet_rows(path: Path, key: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:  # a damaged or foreign file: pyarrow says which in one line
        raise DataError(f"{key}: {path}: not a readable Parquet file ({_what_it_is(path) or one_line(e)})") from None


def _what_it_is(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    found = next((what for magic, what in _BINARY.items() if head.startswith(magic)), None)
    if found and found != "a Parquet file":
        return f"its bytes are {found}'s"
    return None


def _check_text(raw: bytes, path: Path, key: str) -> None:
    """A .jsonl/.json/.csv file must be text: one whose bytes are another format (a Parquet file, an
    archive) is one error for the file, not a bad row for each of its lines."""
    found = next((what for magic, what in _BINARY.items() if raw.startswith(magic)), None)
    if found is None and b"\x00" in raw[:4096]:
        found = "binary (it holds NUL bytes)"
    if found:
        raise DataError(f"{key}: {path}: not a {path.suffix} text file: its content is {found}")


def _object_or_reason(row):
    return row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"


def _jsonl_rows(text: str):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"invalid JSON ({e.msg})"
            continue
        yield n, _object_or_reason(row)


def _clean(row, n: int, where: str, cfg: DataConfig, classification: bool, report: SplitReport) -> dict | None:
    """The row in dsum's columns, or None (recorded in the report, or raised in strict mode)."""
    problem, out = _check(row, cfg, classification)
    if problem is None:
        return out
    message = f"{where}: row {n}: {problem}"
    if cfg.strict:
        raise DataError(message + " (data.strict=true)")
    report.bad.append(message)
    return None


def _check(row, cfg: DataConfig, classification: bool) -> tuple[str | None, dict | None]:
    if isinstance(row, str):
        return row, None
    text_col = cfg.columns.dialogue
    ref_cols = [cfg.columns.summary] if isinstance(cfg.columns.summary, str) else list(cfg.columns.summary)
    for col in [text_col, *ref_cols]:
        if col not in row:
            return f"missing column {col!r} (data.columns)", None
    text = row[text_col]
    if not isinstance(text, str):
        return f"{text_col!r} is {type(text).__name__}, not text", None
    if not text.strip():
        return f"{text_col!r} is empty", None
    if _has_undecodable(text):
        return f"{text_col!r} is not valid UTF-8", None
    if classification:
        label = row[ref_cols[0]]
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            return f"label {ref_cols[0]!r} is {label!r}, not a class number", None
        return None, {"text": text, "label": label}
    refs = []
    for col in ref_cols:
        value = row[col]
        if not isinstance(value, str):
            return f"{col!r} is {type(value).__name__}, not text", None
        if not value.strip():
            return f"{col!r} is empty", None
        if _has_undecodable(value):
            return f"{col!r} is not valid UTF-8", None
        refs.append(value.strip())
    return None, {"dialogue": text.strip(), "summary": refs[0], "references": refs}


def _has_undecodable(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _split(cleaned: dict[str, Dataset], reports: dict[str, SplitReport], cfg: DataConfig):
    """Deterministic split of what the source holds in one piece ("all"): into train/validation/test by
    data.split_ratio, or into train/validation alone when the source has its own test split."""
    if "all" not in cleaned:
        if "train" in cleaned and "test" in cleaned:  # local files for train and test only
            cleaned, reports = dict(cleaned), dict(reports)
            cleaned["all"], reports["all"] = cleaned.pop("train"), reports.pop("train")
        else:
            missing = [s for s in SPLITS if s not in cleaned]
            raise DataError(
                f"data.files: give train and test (validation optional), or one file as data.source (missing {', '.join(missing)})"
            )
    ds, report = cleaned["all"], reports["all"]
    train_r, val_r, test_r = cfg.split_ratio
    if "test" in cleaned:
        val_r, test_r = val_r / (train_r + val_r), 0.0
    n = len(ds)
    n_val, n_test = round(n * val_r), round(n * test_r)
    if n - n_val - n_test < 1 or (val_r and not n_val) or (test_r and not n_test):
        raise DataError(
            f"{report.source}: {n} usable rows are too few to split by data.split_ratio {list(cfg.split_ratio)}"
        )
    order = ds.shuffle(seed=cfg.seed)  # a seeded permutation: the same seed gives the same splits
    parts = {
        "train": order.select(range(n - n_val - n_test)),
        "validation": order.select(range(n - n_val - n_test, n - n_test)),
        "test": cleaned["test"] if "test" in cleaned else order.select(range(n - n_test, n)),
    }
    out_reports = {
        s: SplitReport(source=report.source, bad=report.bad if s == "train" else []) for s in ("train", "validation")
    }
    out_reports["test"] = reports.get("test") or SplitReport(source=report.source)
    return parts, out_reports


def fingerprint(ds: Dataset) -> str:
    """Content hash of a split: equal hashes mean the same rows in the same order."""
    h = hashlib.sha256()
    for row in ds:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- prompting


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt split around the dialogue, so the dialogue alone can be trimmed."""

    prefix: str
    suffix: str
    add_bos: bool


def build_prompt(tokenizer, cfg: DataConfig, task: str) -> Prompt:
    """Causal: the tokenizer's chat template if it has one, else an instruction template. Seq2seq: a prefix."""
    if task == "causal" and cfg.prompt_template is None and cfg.use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": f"{cfg.instruction}\n\n{_SLOT}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        add_bos = False  # chat templates write their own BOS
    else:
        default = DEFAULT_CAUSAL_TEMPLATE if task == "causal" else DEFAULT_SEQ2SEQ_TEMPLATE
        template = cfg.prompt_template or default
        text = template.replace("{instruction}", cfg.instruction).replace("{dialogue}", _SLOT)
        add_bos = task == "causal" and tokenizer.bos_token_id is not None
    prefix, _, suffix = text.partition(_SLOT)
    return Prompt(prefix, suffix, add_bos)


def encode_prompt(dialogue: str, tokenizer, prompt: Prompt, max_source_length: int, eos: bool = False) -> list[int]:
    """Prompt token ids with the dialogue trimmed (at its end) to fit max_source_length."""
    head = ([tokenizer.bos_token_id] if prompt.add_bos else []) + _ids(tokenizer, prompt.prefix)
    tail = _ids(tokenizer, prompt.suffix) + ([tokenizer.eos_token_id] if eos else [])
    budget = max_source_length - len(head) - len(tail)
    if budget <= 0:
        raise DataError(
            f"data.max_source_length ({max_source_length}) leaves no room for the dialogue: the prompt "
            f"template alone takes {len(head) + len(tail)} tokens"
        )
    return head + _ids(tokenizer, dialogue)[:budget] + tail


def encode_causal(row: dict, tokenizer, prompt: Prompt, cfg: DataConfig) -> dict[str, list[int]] | str:
    """input_ids = prompt + summary + EOS; labels carry loss on the summary and EOS only."""
    target = _ids(tokenizer, row["summary"]) + [tokenizer.eos_token_id]
    if len(target) > cfg.max_target_length:
        return f"summary is {len(target)} tokens, over data.max_target_length ({cfg.max_target_length})"
    source = encode_prompt(row["dialogue"], tokenizer, prompt, cfg.max_source_length)
    return {
        "input_ids": source + target,
        "attention_mask": [1] * (len(source) + len(target)),
        "labels": [-100] * len(source) + target,
    }


def encode_seq2seq(row: dict, tokenizer, prompt: Prompt, cfg: DataConfig) -> dict[str, list[int]] | str:
    """Encoder reads prompt + EOS; the decoder's labels are summary + EOS."""
    target = _ids(tokenizer, row["summary"]) + [tokenizer.eos_token_id]
    if len(target) > cfg.max_target_length:
        return f"summary is {len(target)} tokens, over data.max_target_length ({cfg.max_target_length})"
    source = encode_prompt(row["dialogue"], tokenizer, prompt, cfg.max_source_length, eos=True)
    return {"input_ids": source, "attention_mask": [1] * len(source), "labels": target}


def encode_classification(row: dict, tokenizer, cfg: DataConfig) -> dict[str, Any]:
    enc = tokenizer(row["text"], truncation=True, max_length=cfg.max_source_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": row["label"]}


def tokenize_splits(splits: DatasetDict, tokenizer, cfg: DataConfig, task: str) -> tuple[DatasetDict, dict[str, int]]:
    """Tokenized train/validation sets (test is generated from, not trained on); counts rows dropped."""
    prompt = build_prompt(tokenizer, cfg, task)
    out, dropped = {}, {}
    for split in ("train", "validation"):
        rows, bad = [], []
        for i, row in enumerate(splits[split], 1):
            if task == "classification":
                enc = encode_classification(row, tokenizer, cfg)
            else:
                encode = encode_causal if task == "causal" else encode_seq2seq
                enc = encode(row, tokenizer, prompt, cfg)
            if isinstance(enc, str):
                if cfg.strict:
                    raise DataError(f"{split} split: row {i}: {enc} (data.strict=true)")
                bad.append(enc)
                continue
            rows.append(enc)
        if not rows:
            raise DataError(f"{split} split: every row was dropped at tokenization (first: {bad[0]})")
        out[split], dropped[split] = Dataset.from_list(rows), len(bad)
    return DatasetDict(out), dropped


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

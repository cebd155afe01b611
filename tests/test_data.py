"""Data pipeline units: exact tokens and labels, truncation, splits, fingerprints, bad rows, bundled set."""

import json

import pytest
from conftest import JOBS, dsum, write_jsonl

from dsum import data, model
from dsum.config import DataConfig, ModelConfig
from dsum.sample import generate

ROW = {"dialogue": "Ann: Lunch at noon?\nBo: Yes, at the cafe.", "summary": "Ann and Bo will have lunch at noon."}
CFG = DataConfig(
    prompt_template="{instruction}\n{dialogue}\nSummary:",
    instruction="Summarize:",
    max_source_length=24,
    max_target_length=16,
)
# Token ids of the offline BPE trained on the bundled data (deterministic): "Summarize:\n" / "Ann: Lunch at noon" ...
PREFIX = [56, 619, 625, 78, 95, 74, 31, 204]  # Summarize:\n
DIALOGUE = [38, 83, 83, 31, 503, 587, 918, 351, 1054]  # Ann: Lunch at noon   (trimmed to fit 24)
SUFFIX = [204, 56, 619, 625, 94, 31]  # \nSummary:
SUMMARY = [38, 83, 83, 323, 404, 84, 342, 476, 283, 587, 918, 351, 1054, 19]  # Ann and Bo will have lunch at noon.
BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def causal_tok():
    return model.load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def t5_tok():
    return model.load_tokenizer(ModelConfig(name="tiny-t5", task="seq2seq"))


def test_causal_tokens_and_labels_exact(causal_tok):
    enc = data.encode_causal(ROW, causal_tok, data.build_prompt(causal_tok, CFG, "causal"), CFG)
    source = [BOS] + PREFIX + DIALOGUE + SUFFIX
    assert len(source) == CFG.max_source_length
    assert enc["input_ids"] == source + SUMMARY + [EOS]
    # only the summary and EOS carry loss
    assert enc["labels"] == [-100] * len(source) + SUMMARY + [EOS]
    assert (
        causal_tok.decode(enc["input_ids"])
        == "<s>Summarize:\nAnn: Lunch at noon\nSummary:Ann and Bo will have lunch at noon.</s>"
    )


def test_seq2seq_tokens_and_labels_exact(t5_tok):
    enc = data.encode_seq2seq(ROW, t5_tok, data.build_prompt(t5_tok, CFG, "seq2seq"), CFG)
    assert enc["input_ids"] == PREFIX + DIALOGUE + SUFFIX + [EOS]
    assert enc["labels"] == SUMMARY + [EOS]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_pads_are_masked_in_batches(causal_tok):
    from transformers import DataCollatorForSeq2Seq

    prompt = data.build_prompt(causal_tok, CFG, "causal")
    short = data.encode_causal({"dialogue": "A: Hi.", "summary": "A greets."}, causal_tok, prompt, CFG)
    long = data.encode_causal(ROW, causal_tok, prompt, CFG)
    batch = DataCollatorForSeq2Seq(causal_tok, label_pad_token_id=-100)([short, long])
    pad = len(long["input_ids"]) - len(short["input_ids"])
    assert batch["input_ids"][0, -pad:].tolist() == [PAD] * pad
    assert batch["labels"][0, -pad:].tolist() == [-100] * pad
    assert batch["attention_mask"][0, -pad:].tolist() == [0] * pad


def test_truncation_trims_dialogue_never_summary(causal_tok):
    cfg = CFG.model_copy(update={"max_source_length": 18})
    enc = data.encode_causal(ROW, causal_tok, data.build_prompt(causal_tok, cfg, "causal"), cfg)
    assert enc["input_ids"] == [BOS] + PREFIX + DIALOGUE[:3] + SUFFIX + SUMMARY + [EOS]
    too_long = cfg.model_copy(update={"max_target_length": 8})
    assert "over data.max_target_length" in data.encode_causal(
        ROW, causal_tok, data.build_prompt(causal_tok, too_long, "causal"), too_long
    )


def test_chat_template_prompt(causal_tok):
    prompt = data.build_prompt(causal_tok, DataConfig(), "causal")
    assert prompt.prefix == "<s><|user|>\nSummarize the following dialogue.\n\n"
    assert prompt.suffix == "\n<|assistant|>\n" and not prompt.add_bos
    plain = data.build_prompt(causal_tok, DataConfig(use_chat_template=False), "causal")
    assert plain.prefix.startswith("### Instruction:") and plain.add_bos


def test_tokenizer_is_deterministic():
    a = model.build_tokenizer(512, chat=False)
    b = model.build_tokenizer(512, chat=False)
    assert a.get_vocab() == b.get_vocab()


def test_same_seed_same_splits_and_fingerprints():
    a, ra = data.load_splits(DataConfig(seed=7), "causal")
    b, rb = data.load_splits(DataConfig(seed=7), "causal")
    c, rc = data.load_splits(DataConfig(seed=8), "causal")
    assert {k: v.fingerprint for k, v in ra.items()} == {k: v.fingerprint for k, v in rb.items()}
    assert a["test"]["dialogue"] == b["test"]["dialogue"]
    assert ra["test"].fingerprint != rc["test"].fingerprint
    assert [len(a[s]) for s in data.SPLITS] == [288, 36, 36]
    assert not set(a["train"]["dialogue"]) & set(a["test"]["dialogue"])


def test_fingerprint_in_a_fresh_process_matches():
    proc = dsum("validate", JOBS / "tiny-dialogsum.yaml")  # warm import path, then a fresh interpreter
    assert proc.returncode == 0
    import subprocess
    import sys

    code = "from dsum import data; from dsum.config import DataConfig; print(data.load_splits(DataConfig(seed=7), 'causal')[1]['test'].fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == data.load_splits(DataConfig(seed=7), "causal")[1]["test"].fingerprint


def test_source_splits_and_multiple_references(tmp_path):
    rows = [
        {"dialogue": f"A: hi {i}\nB: bye", "summary1": f"s{i}", "summary2": f"t{i}", "summary3": f"u{i}"}
        for i in range(10)
    ]
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", rows)) for s in data.SPLITS}
    cfg = DataConfig(files=files, columns={"summary": ["summary1", "summary2", "summary3"]})
    splits, _ = data.load_splits(cfg, "causal")
    assert len(splits["test"]) == 10
    assert splits["test"][3]["references"] == ["s3", "t3", "u3"] and splits["test"][3]["summary"] == "s3"


def test_csv_and_parquet_sources(tmp_path):
    import pandas as pd

    rows = [{"text": f"A: hi {i}\nB: yes", "sum": f"They talk {i}."} for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        splits, reports = data.load_splits(
            DataConfig(source=str(tmp_path / name), columns={"dialogue": "text", "summary": "sum"}), "causal"
        )
        assert sum(r.rows for r in reports.values()) == 20


def test_bad_rows_counted_and_reported(tmp_path):
    good = [{"dialogue": f"A: hi {i}\nB: ok", "summary": f"A says hi {i}."} for i in range(20)]
    path = tmp_path / "d.jsonl"
    write_jsonl(
        path,
        good[:5]
        + [{"dialogue": "", "summary": "x"}, "{not json", {"dialogue": 3, "summary": "x"}, {"summary": "x"}]
        + good[5:],
    )
    with path.open("ab") as f:
        f.write(b'{"dialogue": "A: caf\xe9", "summary": "bad bytes"}\n')
    splits, reports = data.load_splits(DataConfig(source=str(path)), "causal")
    assert sum(len(splits[s]) for s in data.SPLITS) == 20
    bad = reports["train"].bad
    assert len(bad) == 5
    assert f"{path}: row 6: 'dialogue' is empty" in bad
    assert any("row 7: invalid JSON" in b for b in bad) and any(
        "row 25: 'dialogue' is not valid UTF-8" in b for b in bad
    )


def test_bundled_set_shape():
    rows = [json.loads(line) for line in data.BUNDLED["bundled"].read_text().splitlines()]
    assert len(rows) >= 300 and len({r["dialogue"] for r in rows}) == len(rows)
    turns = [r["dialogue"].count("\n") + 1 for r in rows]
    assert min(turns) == 3 and max(turns) == 30
    tagged = [r for r in rows if r["dialogue"].startswith("#Person1#:")]
    assert 0.2 < len(tagged) / len(rows) < 0.6
    assert all("#Person" in r["summary"] for r in tagged)
    assert all(1 <= r["summary"].count(". ") + 1 <= 2 for r in rows)


def test_bundled_files_are_reproducible_from_generator(tmp_path):
    written = generate.write_all(tmp_path)
    assert {p.name for p in written} == {p.name for p in data.BUNDLED.values()}
    for path in written:
        assert path.read_bytes() == (data.SAMPLE_DIR / path.name).read_bytes(), path.name


def test_bundled_documents_shape():
    """XSum's shape: an article of several sentences, a one-sentence summary that is not one of them."""
    rows = [json.loads(line) for line in data.BUNDLED["bundled-documents"].read_text().splitlines()]
    assert len(rows) == 200 and set(rows[0]) == {"id", "document", "summary"}
    assert len({r["document"] for r in rows}) == len(rows)
    assert all(r["document"].count(". ") >= 3 and r["summary"].count(". ") == 0 for r in rows)
    assert not any(r["summary"] in r["document"] for r in rows)


def test_packing_collator_keeps_examples_apart(causal_tok):
    from transformers import DataCollatorWithFlattening

    prompt = data.build_prompt(causal_tok, CFG, "causal")
    a = data.encode_causal(ROW, causal_tok, prompt, CFG)
    b = data.encode_causal({"dialogue": "A: Hi.", "summary": "A greets."}, causal_tok, prompt, CFG)
    batch = DataCollatorWithFlattening(return_position_ids=True)([a, b])
    n, m = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == (1, n + m)  # one row, no padding
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(m))
    # the first token of the second example is never a target of the first
    assert batch["labels"][0, n].item() == -100


def test_local_dataset_directory_goes_through_load_dataset(tmp_path):
    rows = [{"dialogue": f"A: hi {i}\nB: bye", "summary": f"A and B part {i}."} for i in range(30)]
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    splits, reports = data.load_splits(DataConfig(source=str(tmp_path)), "causal")
    assert [len(splits[s]) for s in data.SPLITS] == [30, 30, 30]
    assert reports["test"].source == f"{tmp_path}[test]"
    (tmp_path / "validation.jsonl").unlink()  # train + test only: validation is carved from train
    splits, _ = data.load_splits(DataConfig(source=str(tmp_path), split_ratio=(0.8, 0.2, 0.0)), "causal")
    assert [len(splits[s]) for s in data.SPLITS] == [24, 6, 30]


def test_a_checkpoint_is_checked_before_anything_loads(tmp_path):
    from dsum import train

    for step, complete in ((4, True), (8, False)):  # 8 cut short by a kill: trainer_state.json is written last
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert train.check_checkpoint(tmp_path / "checkpoint-4") == 4
    with pytest.raises(train.TrainError, match="checkpoint-8 is not a readable checkpoint"):
        train.check_checkpoint(tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-4/adapter_model.safetensors").unlink()
    with pytest.raises(train.TrainError, match=r"checkpoint-4 \(step 4\) holds no weights"):
        train.check_checkpoint(tmp_path / "checkpoint-4")

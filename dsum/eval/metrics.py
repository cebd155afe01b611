"""Metrics: ROUGE-1/2/L/Lsum (rouge-score), BLEU (sacrebleu), BERTScore (bert-score), semantic similarity,
accuracy/F1, and paired-bootstrap confidence intervals of base-vs-tuned differences."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from dsum.errors import DsumError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BERTSCORE_PARTS = ("bertscore_precision", "bertscore_recall")
"""Kept per example in the predictions; the table, the plots and MLflow carry bertscore_f1."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge_scores(predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
    """Per-example ROUGE F1 (stemmed); with several references, the best match counts (rouge-score's score_multi)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rows = []
    for pred, refs in zip(predictions, references, strict=True):
        # rougeLsum reads sentences from newlines
        scores = scorer.score_multi([_sentences(r) for r in refs], _sentences(pred))
        rows.append({k: scores[k].fmeasure for k in ROUGE_KEYS})
    return rows


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with every reference stream; examples with fewer references repeat their last."""
    import sacrebleu

    n = max(len(r) for r in references)
    streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(n)]
    return sacrebleu.corpus_bleu(predictions, streams).score


def summary_scores(
    predictions: list[str], references: list[list[str]], similarity_model: str | None = None, bertscore_cfg=None
) -> list[dict[str, float]]:
    """Per-example ROUGE, and BERTScore and semantic similarity when their encoders are given."""
    rows = rouge_scores(predictions, references)
    if bertscore_cfg is not None and bertscore_cfg.model:
        scored = bertscore(bertscore_cfg.model, predictions, references, bertscore_cfg.layer, bertscore_cfg.batch_size)
        for row, bs in zip(rows, scored, strict=True):
            row.update(bs)
    if similarity_model:
        for row, sim in zip(rows, similarity(similarity_model, predictions, references), strict=True):
            row["similarity"] = sim
    return rows


def bertscore(
    model_path: str, predictions: list[str], references: list[list[str]], layer: int | None = None, batch_size: int = 32
) -> list[dict[str, float]]:
    """Per-example BERTScore (bert-score, no idf, no baseline rescaling) of each prediction against its
    references, the best-matching reference counting, from the token embeddings of a local encoder's
    `layer` (default: its last)."""
    import bert_score

    depth = check_encoder(model_path, "eval.bertscore.model", layer, "eval.bertscore.layer")
    # An empty prediction scores 0, as bert-score itself rules; it is kept out of the call because
    # bert-score encodes an empty text with a tokenizer method transformers 5 no longer has.
    scored = [i for i, p in enumerate(predictions) if p.strip()]
    rows = [{"bertscore_f1": 0.0, "bertscore_precision": 0.0, "bertscore_recall": 0.0} for _ in predictions]
    if not scored:
        return rows
    p, r, f = bert_score.score(
        [predictions[i] for i in scored],
        [references[i] for i in scored],
        model_type=model_path,
        num_layers=layer or depth,
        batch_size=batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    for i, pi, ri, fi in zip(scored, p.tolist(), r.tolist(), f.tolist(), strict=True):
        rows[i] = {"bertscore_f1": fi, "bertscore_precision": pi, "bertscore_recall": ri}
    return rows


def check_encoder(path: str, key: str, layer: int | None = None, layer_key: str = "") -> int:
    """The number of layers of the encoder at `path`; a one-line error naming `key` (or `layer_key`) when
    path is no encoder model directory or `layer` is beyond its depth. Reads config.json only."""
    where = Path(path)
    if not where.is_dir():
        raise DsumError(f"{key}: {path}: no such directory (a local encoder model directory)")
    try:
        cfg = json.loads((where / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsumError(f"{key}: {path}: not a model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise DsumError(f"{key}: {path}/config.json: not readable: {e}") from None
    archs = cfg.get("architectures") or []
    generative = [a for a in archs if a.endswith(("ForCausalLM", "ForConditionalGeneration", "Seq2SeqLM"))]
    depth = cfg.get("num_hidden_layers")
    if generative or cfg.get("is_encoder_decoder") or not isinstance(depth, int):
        kind = generative[0] if generative else cfg.get("model_type", "model")
        raise DsumError(f"{key}: {path}: a {kind}, not an encoder (e.g. BERT, MiniLM, RoBERTa)")
    if layer is not None and layer > depth:
        raise DsumError(f"{layer_key}: {layer} is beyond the encoder's {depth} layers ({path})")
    return depth


def mean_scores(per_example: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in per_example])) for k in per_example[0] if k not in BERTSCORE_PARTS}


def paired_bootstrap(base: list[float], tuned: list[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(tuned - base) over examples resampled with replacement (pairs kept together)."""
    diff = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
    low, high = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def bleu_bootstrap(
    base: list[str], tuned: list[str], references: list[list[str]], samples: int, seed: int = 0
) -> tuple[float, float]:
    """95% interval of corpus-BLEU(tuned) - corpus-BLEU(base) over paired resamples of the examples."""
    rng = np.random.default_rng(seed)
    n = len(tuned)
    diffs = []
    for _ in range(samples):
        idx = rng.integers(0, n, size=n)
        refs = [references[i] for i in idx]
        diffs.append(bleu([tuned[i] for i in idx], refs) - bleu([base[i] for i in idx], refs))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def compare(
    base_scores: list[dict[str, float]],
    tuned_scores: list[dict[str, float]],
    base_preds: list[str],
    tuned_preds: list[str],
    references: list[list[str]],
    samples: int,
) -> dict[str, dict[str, float]]:
    """metric -> base, tuned, delta and the paired-bootstrap 95% CI of the delta."""
    table = {}
    for key in (k for k in tuned_scores[0] if k not in BERTSCORE_PARTS):
        b, t = [r[key] for r in base_scores], [r[key] for r in tuned_scores]
        low, high = paired_bootstrap(b, t, samples)
        table[key] = {
            "base": float(np.mean(b)),
            "tuned": float(np.mean(t)),
            "delta": float(np.mean(t) - np.mean(b)),
            "ci_low": low,
            "ci_high": high,
        }
    b, t = bleu(base_preds, references), bleu(tuned_preds, references)
    low, high = bleu_bootstrap(base_preds, tuned_preds, references, max(100, samples // 5))
    table["bleu"] = {"base": b, "tuned": t, "delta": t - b, "ci_low": low, "ci_high": high}
    return table


@torch.no_grad()
def similarity(
    model_path: str, predictions: list[str], references: list[list[str]], batch_size: int = 32
) -> list[float]:
    """Cosine similarity of mean-pooled sentence embeddings (a local encoder such as MiniLM); best reference counts."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    enc = AutoModel.from_pretrained(model_path).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    pred = embed(predictions)
    flat = [r for refs in references for r in refs]
    ref = embed(flat)
    sims, start = [], 0
    for i, refs in enumerate(references):
        sims.append(float((ref[start : start + len(refs)] @ pred[i]).max()))
        start += len(refs)
    return sims


def classification_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="macro")),
    }


def _sentences(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)

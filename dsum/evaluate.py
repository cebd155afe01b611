"""Evaluation: batched generation and metrics (ROUGE-1/2/L/Lsum with rouge-score, BLEU with sacrebleu).

Summaries are the tokens generated after the prompt (decoder-only) or the decoder's output
(encoder-decoder): no prompt echo to strip, no delimiter to search for.
"""

from __future__ import annotations

import re

import torch

from dsum import data
from dsum.config import DataConfig, EvalConfig

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@torch.no_grad()
def generate(model, tokenizer, dialogues: list[str], data_cfg: DataConfig, cfg: EvalConfig, task: str) -> list[str]:
    """Summaries for dialogues, generated in batches of similar length (restored to input order)."""
    prompt = data.build_prompt(tokenizer, data_cfg, task)
    encoded = [
        data.encode_prompt(d, tokenizer, prompt, data_cfg.max_source_length, eos=task == "seq2seq") for d in dialogues
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    # Decoder-only models continue the last token, so batches are padded on the left.
    tokenizer.padding_side = "left" if task == "causal" else "right"
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature if cfg.do_sample else None,
            top_p=cfg.top_p if cfg.do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if task == "causal":
            generated = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
            out[i] = text.strip()
    return out


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


def summary_metrics(
    predictions: list[str], references: list[list[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    per_example = rouge_scores(predictions, references)
    means = {k: sum(r[k] for r in per_example) / len(per_example) for k in ROUGE_KEYS}
    means["bleu"] = bleu(predictions, references)
    return means, per_example


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], data_cfg: DataConfig, cfg: EvalConfig) -> list[int]:
    tokenizer.padding_side = "right"
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(
            texts[start : start + cfg.batch_size],
            truncation=True,
            max_length=data_cfg.max_source_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def classification_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": accuracy_score(labels, predictions), "f1": f1_score(labels, predictions, average="macro")}


def _sentences(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)

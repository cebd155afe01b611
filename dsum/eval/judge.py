"""LLM judge: scores a summary 1-5 on relevance, coherence, consistency and fluency, given its dialogue.

The judge is any OpenAI-compatible chat endpoint (base URL and model from the job, key from the
environment) or a local Hugging Face model. Its answer must be one JSON object with the four integer
scores; anything else is malformed and retried with backoff. An example that still fails is recorded
as failed: the evaluation goes on.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable

from dsum.config import JudgeConfig

CRITERIA = ("relevance", "coherence", "consistency", "fluency")
RUBRIC = (
    "You grade a summary of a dialogue. Score it from 1 (worst) to 5 (best) on each criterion:\n"
    "- relevance: it keeps the important content of the dialogue and leaves out the rest;\n"
    "- coherence: it is well structured and well organized;\n"
    "- consistency: every fact in it is supported by the dialogue, nothing is made up;\n"
    "- fluency: it is grammatical and easy to read.\n"
    'Answer with one JSON object and nothing else, for example {"relevance": 4, "coherence": 5, '
    '"consistency": 3, "fluency": 5}.'
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

Ask = Callable[[list[dict[str, str]]], str]


class MalformedAnswer(ValueError):
    pass


def messages_for(dialogue: str, summary: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RUBRIC},
        {"role": "user", "content": f"Dialogue:\n{dialogue}\n\nSummary:\n{summary}"},
    ]


def parse_scores(text: str | None) -> dict[str, int]:
    """The four scores from an answer that is exactly one JSON object (a ```json fence is allowed)."""
    if not text or not text.strip():
        raise MalformedAnswer("empty answer")
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        raise MalformedAnswer(f"not a JSON object: {text.strip()[:80]!r}") from None
    if not isinstance(obj, dict):
        raise MalformedAnswer(f"not a JSON object: {text.strip()[:80]!r}")
    missing = [c for c in CRITERIA if c not in obj]
    if missing:
        raise MalformedAnswer(f"missing {', '.join(missing)}")
    extra = sorted(set(obj) - set(CRITERIA))
    if extra:
        raise MalformedAnswer(f"unexpected keys {', '.join(extra)}")
    scores = {}
    for c in CRITERIA:
        v = obj[c]
        if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v):
            raise MalformedAnswer(f"{c} is {v!r}, not a whole number")
        if not 1 <= v <= 5:
            raise MalformedAnswer(f"{c} is {v}, outside 1-5")
        scores[c] = int(v)
    return scores


def judge_all(
    dialogues: list[str], summaries: list[str], ask: Ask, max_retries: int, backoff: float, sleep=time.sleep
) -> list[dict]:
    """Per example: {"scores": {...}, "attempts": n} or {"error": "...", "attempts": n}."""
    results = []
    for dialogue, summary in zip(dialogues, summaries, strict=True):
        last: Exception | None = None
        for attempt in range(max_retries + 1):
            if attempt:
                sleep(backoff * 2 ** (attempt - 1))
            try:
                results.append({"scores": parse_scores(ask(messages_for(dialogue, summary))), "attempts": attempt + 1})
                break
            except Exception as e:  # malformed answers and transport errors alike are retried
                last = e
        else:
            results.append({"error": f"{type(last).__name__}: {last}", "attempts": max_retries + 1})
    return results


def summarize_judgements(results: list[dict]) -> dict[str, float]:
    ok = [r["scores"] for r in results if "scores" in r]
    out = {f"judge_{c}": sum(s[c] for s in ok) / len(ok) for c in CRITERIA} if ok else {}
    out["judge_failed"] = len(results) - len(ok)
    return out


def endpoint_asker(cfg: JudgeConfig, base_url: str) -> Ask:
    """An OpenAI-compatible chat client; dsum does the retrying, so the client's own is off."""
    from openai import OpenAI

    client = OpenAI(
        base_url=base_url, api_key=os.environ.get(cfg.api_key_env) or "unset", max_retries=0, timeout=cfg.timeout
    )

    def ask(messages):
        reply = client.chat.completions.create(model=cfg.model, messages=messages, temperature=0, max_tokens=100)
        return reply.choices[0].message.content

    return ask


def local_asker(path: str, max_new_tokens: int = 64) -> Ask:
    """A local causal model as judge (greedy), prompted through its chat template when it has one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    @torch.no_grad()
    def ask(messages):
        if tok.chat_template:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n\n", return_tensors="pt")
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    return ask


def judge(cfg: JudgeConfig, dialogues: list[str], summaries: list[str]) -> list[dict] | None:
    """Judge the summaries, or None when no judge is set (job or DSUM_JUDGE_BASE_URL)."""
    base_url = cfg.base_url or os.environ.get("DSUM_JUDGE_BASE_URL")
    if cfg.local_model:
        ask = local_asker(cfg.local_model)
    elif base_url:
        ask = endpoint_asker(cfg, base_url)
    else:
        return None
    n = min(len(dialogues), cfg.max_examples or len(dialogues))
    return judge_all(dialogues[:n], summaries[:n], ask, cfg.max_retries, cfg.backoff)

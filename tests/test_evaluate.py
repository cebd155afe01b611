"""Metrics against rouge-score/sacrebleu by hand, paired bootstrap, judge parsing and its HTTP client."""

import json

import pytest
import sacrebleu
from conftest import JOBS, MINILM
from judge_server import JudgeServer
from rouge_score import rouge_scorer

from dsum import config, model
from dsum.config import BertScoreConfig, JudgeConfig
from dsum.errors import DsumError
from dsum.eval import generate, judge, metrics, predict
from dsum.eval.run import _eval_rows

PREDS = ["the cat sat on the mat. it slept", "Tom will call Ann at noon.", "nothing alike"]
REFS = [
    ["the cat sat on the mat", "a cat slept on a mat. it was warm"],
    ["Tom calls Ann at noon.", "Ann and Tom talk at 12.", "Tom will phone Ann at midday."],
    ["completely different words here"],
]


def test_rouge_single_reference_by_hand():
    # pred "the cat sat" vs ref "the cat sat on the mat": unigram P = 3/3, R = 3/6, F = 2/3
    (row,) = metrics.rouge_scores(["the cat sat"], [["the cat sat on the mat"]])
    assert row["rouge1"] == pytest.approx(2 / 3)
    assert row["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)  # bigrams: 2/2 and 2/5
    assert row["rougeL"] == pytest.approx(2 / 3)


def test_rouge_multi_reference_matches_rouge_score_best_reference():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    rows = metrics.rouge_scores(PREDS, REFS)
    for pred, refs, row in zip(PREDS, REFS, rows, strict=True):
        for key in ("rouge1", "rouge2", "rougeL"):
            assert row[key] == pytest.approx(max(scorer.score(r, pred)[key].fmeasure for r in refs))
        # Lsum reads sentences from newlines
        lsum = max(scorer.score(r.replace(". ", ".\n"), pred.replace(". ", ".\n"))["rougeLsum"].fmeasure for r in refs)
        assert row["rougeLsum"] == pytest.approx(lsum)
    assert rows[1]["rouge1"] > scorer.score(REFS[1][1], PREDS[1])["rouge1"].fmeasure  # the best reference won


def test_rouge_lsum_is_sentence_level():
    # the same two sentences in another order: summary-level LCS matches all, plain LCS does not
    (row,) = metrics.rouge_scores(["it slept. the cat sat on the mat."], [["the cat sat on the mat. it slept."]])
    assert row["rougeLsum"] == pytest.approx(1.0) and row["rougeL"] < 0.9


def test_bleu_matches_sacrebleu_with_reference_streams():
    refs = [r + [r[-1]] * (3 - len(r)) for r in REFS]  # sacrebleu wants equal streams: repeat the last
    expected = sacrebleu.corpus_bleu(PREDS, [[r[k] for r in refs] for k in range(3)]).score
    assert metrics.bleu(PREDS, REFS) == pytest.approx(expected)


def test_paired_bootstrap():
    assert metrics.paired_bootstrap([0.2, 0.4, 0.6], [0.3, 0.5, 0.7], 500) == pytest.approx((0.1, 0.1))
    base = [0.1 * (i % 7) for i in range(50)]
    tuned = [b + (0.2 if i % 2 else -0.05) for i, b in enumerate(base)]
    low, high = metrics.paired_bootstrap(base, tuned, 2000)
    assert low < sum(t - b for b, t in zip(base, tuned, strict=True)) / 50 < high and low > 0


def test_similarity_with_a_local_encoder():
    same, other = metrics.similarity(
        MINILM, ["Tom will call Ann.", "Tom will call Ann."], [["Tom will call Ann."], ["The fridge is broken."]]
    )
    assert same == pytest.approx(1.0, abs=1e-5) and other < 0.5


def test_bertscore_matches_bert_score_called_directly():
    """With the real MiniLM encoder: the same P, R and F1 as bert_score.score on the same pairs (several
    references: the best one counts), at the layer asked for and, by default, the encoder's last."""
    import bert_score

    for layer in (4, None):
        rows = metrics.bertscore(MINILM, PREDS, REFS, layer=layer)
        p, r, f = bert_score.score(PREDS, REFS, model_type=MINILM, num_layers=layer or 6)
        assert [x["bertscore_precision"] for x in rows] == pytest.approx(p.tolist(), abs=1e-6)
        assert [x["bertscore_recall"] for x in rows] == pytest.approx(r.tolist(), abs=1e-6)
        assert [x["bertscore_f1"] for x in rows] == pytest.approx(f.tolist(), abs=1e-6)
    empty, same = metrics.bertscore(MINILM, ["", "Tom will call Ann."], [["Tom calls."], ["Tom will call Ann."]])
    assert empty == {"bertscore_f1": 0.0, "bertscore_precision": 0.0, "bertscore_recall": 0.0}  # as bert-score rules
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-5) and rows[1]["bertscore_f1"] > rows[2]["bertscore_f1"]


def test_bertscore_f1_is_in_the_table_and_precision_recall_stay_per_example():
    cfg = BertScoreConfig(model=MINILM, layer=4)
    tuned = metrics.summary_scores(PREDS, REFS, bertscore_cfg=cfg)
    base = metrics.summary_scores(["a", "b", "c"], REFS, bertscore_cfg=cfg)
    assert {"bertscore_f1", "bertscore_precision", "bertscore_recall"} <= set(tuned[0])
    table = metrics.compare(base, tuned, ["a", "b", "c"], PREDS, REFS, 200)
    assert "bertscore_f1" in table and not set(metrics.BERTSCORE_PARTS) & set(table)
    assert table["bertscore_f1"]["delta"] > 0
    # its CI is the paired bootstrap of the per-example F1s (the same resamples, seeded)
    per_example = [[row["bertscore_f1"] for row in rows] for rows in (base, tuned)]
    ci = (table["bertscore_f1"]["ci_low"], table["bertscore_f1"]["ci_high"])
    assert ci == metrics.paired_bootstrap(*per_example, 200) and ci[0] < ci[1]


def test_eval_sample_seed_draws_the_same_random_examples():
    def ids(*overrides):
        job = config.load(JOBS / "tiny-documents.yaml", list(overrides))
        return _eval_rows(job, None, None)[0]["dialogue"]  # the articles are unique

    order = ids()
    first, one, again, two = (
        ids("eval.max_samples=5"),
        *(ids("eval.max_samples=5", f"eval.sample_seed={s}") for s in (1, 1, 2)),
    )
    assert first == order[:5] and one == again != two and one != first
    assert [order.index(i) for i in one] == sorted(order.index(i) for i in one)  # kept in the split's order


@pytest.mark.parametrize(
    "answer,problem",
    [
        ("The summary is good.", "not a JSON object"),
        ('{"relevance": 6, "coherence": 5, "consistency": 4, "fluency": 5}', "relevance is 6, outside 1-5"),
        ('Scores: {"relevance": 4, "coherence": 5, "consistency": 4, "fluency": 5}', "not a JSON object"),
        ('{"relevance": 4, "coherence": 5, "consistency": 4}', "missing fluency"),
        (
            '{"relevance": "high", "coherence": 5, "consistency": 4, "fluency": 5}',
            "relevance is 'high', not a whole number",
        ),
        ('{"relevance": 4.5, "coherence": 5, "consistency": 4, "fluency": 5}', "relevance is 4.5, not a whole number"),
        ('{"relevance": 4, "coherence": 5, "consistency": 4, "fluency": 5, "overall": 5}', "unexpected keys overall"),
        ("", "empty answer"),
    ],
)
def test_judge_rejects_malformed_answers(answer, problem):
    with pytest.raises(judge.MalformedAnswer, match=problem):
        judge.parse_scores(answer)


def test_judge_accepts_plain_and_fenced_json():
    expected = {"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 5}
    assert judge.parse_scores('{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 5}') == expected
    assert (
        judge.parse_scores('```json\n{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 5.0}\n```')
        == expected
    )


GOOD = '{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 5}'


def test_judge_client_against_openai_compatible_server(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    script = [
        "Looks fine to me!",
        GOOD,  # example 1: malformed, then good
        500,
        GOOD,  # example 2: server error, then good
        "4/5",
        "relevance: 4",
        '{"relevance": 9}',
        "no",  # example 3: malformed every time -> failed
        GOOD,  # example 4
    ]
    with JudgeServer(script) as server:
        cfg = JudgeConfig(
            base_url=server.base_url, model="judge-x", api_key_env="JUDGE_KEY", max_retries=3, backoff=0.01
        )
        results = judge.judge(cfg, ["A: hi\nB: bye"] * 4, ["They greet."] * 4)
    assert [r.get("attempts") for r in results] == [2, 2, 4, 1]
    assert results[0]["scores"] == results[1]["scores"] == results[3]["scores"] == judge.parse_scores(GOOD)
    assert "error" in results[2] and "MalformedAnswer" in results[2]["error"]
    assert judge.summarize_judgements(results) == {
        "judge_relevance": 4.0,
        "judge_coherence": 5.0,
        "judge_consistency": 3.0,
        "judge_fluency": 5.0,
        "judge_failed": 1,
    }
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-x" and first["body"]["messages"][0]["role"] == "system"
    assert "Dialogue:\nA: hi\nB: bye" in first["body"]["messages"][1]["content"]


def test_judge_unreachable_endpoint_fails_per_example():
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff=0.0, timeout=2)
    results = judge.judge(cfg, ["A: hi"] * 2, ["x"] * 2)
    assert all("error" in r and r["attempts"] == 2 for r in results)


def test_no_judge_configured(monkeypatch):
    monkeypatch.delenv("DSUM_JUDGE_BASE_URL", raising=False)
    assert judge.judge(JudgeConfig(), ["a"], ["b"]) is None


@pytest.fixture(scope="module")
def tiny_causal():
    from dsum import config, data

    job = config.load(JOBS / "tiny-dialogsum.yaml", ["eval.max_new_tokens=24"])
    dialogues = data.load_splits(job.data, job.model.task)[0]["test"]["dialogue"][:13]
    return job, model.load_tokenizer(job.model), model.load_base(job.model, job.method), dialogues


@pytest.mark.parametrize("batch_size", [13, 5])
def test_batched_generation_matches_one_at_a_time(tiny_causal, batch_size):
    """Sliced prefill into a static cache, then one decode for the batch: the same greedy summaries as
    generating every dialogue alone (no padding, dynamic cache)."""
    job, tokenizer, base, dialogues = tiny_causal
    one = generate.generate(
        base, tokenizer, dialogues, job.data, job.eval.model_copy(update={"batch_size": 1}), "causal"
    )
    cfg = job.eval.model_copy(update={"batch_size": batch_size})
    assert generate.generate(base, tokenizer, dialogues, job.data, cfg, "causal") == one
    assert all(one) and not any("Summary" in s for s in one)  # text after the prompt, no echo


def test_sliced_prefill_fills_the_cache_plain_generate_would(tiny_causal):
    import torch

    job, tokenizer, base, dialogues = tiny_causal
    [(_, batch)] = generate.prompt_batches(tokenizer, dialogues, job.data, "causal", len(dialogues))
    filled = generate._prefill(base, batch, max_new_tokens=4)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        plain = base.generate(**batch, output_scores=True, return_dict_in_generate=True, **kwargs)
        ours = base.generate(**filled, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(plain.sequences, ours.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(plain.scores), atol=1e-4, rtol=1e-4)


def test_a_batch_alone_is_the_batch_generate_makes_among_the_others(tiny_causal):
    """predict cuts a split into generate's own batches (by prompt length), so a batch generated alone, on any
    worker, is the same padded batch and gives the same summaries as the whole split generated at once."""
    job, tokenizer, base, dialogues = tiny_causal
    cfg = job.eval.model_copy(update={"batch_size": 4})
    cut = generate.batch_positions(tokenizer, dialogues, job.data, "causal", 4)
    assert cut == [idx for idx, _ in generate.prompt_batches(tokenizer, dialogues, job.data, "causal", 4)]
    assert sorted(i for b in cut for i in b) == list(range(len(dialogues))) and len(cut) == 4
    whole = generate.generate(base, tokenizer, dialogues, job.data, cfg, "causal")
    for positions in cut:
        alone = generate.generate(base, tokenizer, [dialogues[i] for i in positions], job.data, cfg, "causal")
        assert alone == [whole[i] for i in positions]


def test_kept_outputs_survive_a_kill_and_belong_to_their_key(tmp_path):
    """generated.jsonl keeps each finished batch; opened again under the same key it keeps them (a line a kill
    cut short, and what follows, is dropped) and appends; under another key it starts anew."""
    path, key = tmp_path / predict.PARTIAL, {"rows": "r1", "weights": "w1", "settings": "s1", "batches": 2}
    with predict._Kept(path, key) as kept:
        kept.add(predict.Work("tuned", 1, (2, 0)), ["c", "a"])
    with path.open("a") as f:
        f.write('{"kind": "tuned", "batch": 0, "positio')  # a kill while writing
    kept = predict._Kept(path, key)
    assert kept.outputs == {("tuned", 1): ["c", "a"]}
    with kept:
        kept.add(predict.Work("tuned", 0, (1,)), ["b"])
    assert [json.loads(line) for line in path.read_text().splitlines()][1:] == [
        {"kind": "tuned", "batch": 1, "positions": [2, 0], "outputs": ["c", "a"]},
        {"kind": "tuned", "batch": 0, "positions": [1], "outputs": ["b"]},
    ]
    assert predict._Kept(path, key).predictions(["tuned"], [[1], [2, 0]], 3) == {"tuned": ["a", "b", "c"]}
    assert predict.unfinished([tmp_path], key, "eval.json") == tmp_path
    (tmp_path / "eval.json").write_text("{}")
    assert predict.unfinished([tmp_path], key, "eval.json") is None, "a finished evaluation is not continued"
    assert predict._Kept(path, key | {"weights": "w2"}).outputs == {}
    assert path.read_text().splitlines() == [json.dumps(key | {"weights": "w2"})]
    with (
        pytest.raises(DsumError, match="batch 0 came back with 2 outputs for 1 rows"),
        predict._Kept(path, key) as kept,
    ):
        kept.add(predict.Work("base", 0, (1,)), ["x", "y"])

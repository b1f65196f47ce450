"""LongBench: the official metrics and the paper's on hand-computed cases, and the runner end to
end, under both protocols, on a small fixture in the official format (tests/fixtures/longbench)
with the bundled model."""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from dashkv_jax import DashKVError
from dashkv_jax.evaluation import longbench
from dashkv_jax.evaluation.longbench import (
    FIELDS,
    MAX_NEW_TOKENS,
    NO_CHAT_TASKS,
    PAPER_TASKS,
    PROMPTS,
    PROTOCOLS,
    build_prompt,
    load_longbench,
    run_longbench,
    truncate_middle,
)
from dashkv_jax.evaluation.metrics import (
    PAPER_TASK_METRICS,
    PROTOCOL_METRICS,
    TASK_METRICS,
    classification_score,
    code_sim_score,
    count_score,
    exact_match_score,
    mean_score,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_l_score,
    score_prediction,
    task_metric,
)

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_TASKS = ("hotpotqa", "gov_report", "trec", "lcc")
# With hotpotqa and gov_report above, the paper's six tasks.
PAPER_FIXTURE_TASKS = ("narrativeqa", "qasper", "multi_news", "triviaqa")


# Metrics --------------------------------------------------------------------------------------


def test_normalize_answer():
    # Lowercase, punctuation out ("-" and "!" go, so the words join), articles out.
    assert normalize_answer("The Eiffel-Tower!") == "eiffeltower"
    # Articles go only as whole words: "an" inside "another" stays.
    assert normalize_answer("  An answer,  another   one ") == "answer another one"


def test_qa_f1_score():
    # "cat sat" against "cat sat down": 2 shared tokens, P = 2/2, R = 2/3,
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 4/5.
    assert qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # Repeats count once per match: overlap of {cat: 2, dog: 1} and {cat: 1, dog: 2} is 2,
    # P = R = 2/3, F1 = 2/3.
    assert qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert qa_f1_score("James Lovell.", "james lovell") == 1.0
    assert qa_f1_score("Frank Borman", "James Lovell") == 0.0
    assert qa_f1_score("", "James Lovell") == 0.0


def test_rouge_l_score():
    # One sentence each. LCS of "the cat sat on the mat" and "the cat lay on the mat" is
    # "the cat on the mat"; its distinct words {the, cat, on, mat} are 4 hits. Distinct words:
    # 5 in the reference, 5 in the prediction, so R = P = 4/5 and F = 0.8 (a plain LCS F1
    # would give 5/6: the `rouge` package counts distinct words).
    assert rouge_l_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8)
    # Sentences split at '.', matched each against each, case-sensitive. Reference sentences
    # [dogs bark loudly], [cats sleep]; predicted [Cats sleep], [Dogs bark]: hits {bark, sleep}.
    # R = 2/5 (dogs bark loudly cats sleep), P = 2/4 (Cats sleep Dogs bark),
    # F = 2 * 0.4 * 0.5 / 0.9 = 4/9.
    assert rouge_l_score("Cats sleep. Dogs bark", "dogs bark loudly. cats sleep") == pytest.approx(
        4 / 9
    )
    # Which LCS is read back matters: "x y x" and "y x x" share "y x" and "x x". The package's
    # tie-break reads back "y x": hits {x, y}, R = P = 1. (The other LCS would give 0.5.)
    assert rouge_l_score("y x x", "x y x") == pytest.approx(1.0)
    # Text after the last '.' that is only whitespace is a sentence of one empty word: the
    # prediction has 3 distinct words {Hello, world, ''}, P = 2/3, R = 1, F = 0.8.
    assert rouge_l_score("Hello world. ", "Hello world") == pytest.approx(0.8)
    assert rouge_l_score("", "Hello world") == 0.0
    assert rouge_l_score("...", "Hello world") == 0.0


def test_classification_score():
    classes = ["City", "Date", "location", "Other location"]
    assert classification_score("City", "City", classes) == 1.0
    # Two classes named, the right one among them: 1/2.
    assert classification_score("City or Date", "City", classes) == 0.5
    assert classification_score("Date", "City", classes) == 0.0
    # "location" is inside the ground truth "Other location", so it is not counted against it.
    assert classification_score("Other location", "Other location", classes) == 1.0
    # LongBench removes such names while iterating, which skips the next one: with "Other"
    # first, "Other" is removed, "location" slides into its slot and is skipped, and the
    # matches stay [location, Other location]: 1/2, as LongBench scores it.
    quirky = ["Other", "location", "Other location"]
    assert classification_score("Other location", "Other location", quirky) == 0.5


def test_code_sim_score():
    # The first line without a backtick, '#' or '//' is compared.
    assert code_sim_score("```python\n# next\nreturn x + y\n```", "return x + y") == 1.0
    # Indel similarity: "return x+y" (10 chars) is a subsequence of "return x + y" (12), so the
    # distance is 2 and the ratio (10 + 12 - 2) / 22 = 90.9%, rounded to 91%.
    assert code_sim_score("\nreturn x+y", "return x + y") == 0.91
    # kitten / sitting: LCS "ittn" = 4, distance 6 + 7 - 2 * 4 = 5, ratio 8/13 = 61.5% -> 62%.
    assert code_sim_score("kitten", "sitting") == 0.62
    assert code_sim_score("// only a comment", "return x") == 0.0


def test_count_and_retrieval_scores():
    # Numbers 3 and 5 in the prediction, one of them right: 1/2.
    assert count_score("There are 3 unique paragraphs out of 5", "3") == 0.5
    assert count_score("3", "3") == 1.0
    assert count_score("none", "3") == 0.0
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    # "1" is not "12": one right number out of two.
    assert retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_zh_score("段落3", "段落3") == 1.0
    with pytest.raises(DashKVError, match="names no paragraph"):
        retrieval_score("Paragraph 1", "the first one")


def test_exact_match_score():
    # Both sides normalised as LongBench normalises answers: lowercased, punctuation and the
    # articles out, whitespace collapsed. "The Eiffel Tower." -> "eiffel tower".
    assert exact_match_score("The Eiffel Tower.", "eiffel  tower") == 1.0
    assert exact_match_score("an Apple", "apple!") == 1.0
    # Anything more or less is a miss, however close: "eiffel tower in paris" != "eiffel tower"
    # (its F1 would be 2 * (2/4) * 1 / (2/4 + 1) = 2/3).
    assert exact_match_score("Eiffel Tower in Paris", "Eiffel Tower") == 0.0
    assert qa_f1_score("Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert exact_match_score("Tower Eiffel", "Eiffel Tower") == 0.0  # order matters
    assert exact_match_score("", "Eiffel Tower") == 0.0


def test_the_paper_protocol_is_its_six_tasks_f1_and_triviaqa_em():
    # The paper's Table 1, in its order: NarrativeQA, HotpotQA, Qasper, MultiNews, GovReport by
    # F1, TriviaQA by exact match.
    assert PAPER_TASKS == tuple(PAPER_TASK_METRICS) == (
        "narrativeqa", "hotpotqa", "qasper", "multi_news", "gov_report", "triviaqa"
    )  # fmt: skip
    assert {t: m.__name__ for t, m in PAPER_TASK_METRICS.items()} == {
        "narrativeqa": "qa_f1_score", "hotpotqa": "qa_f1_score", "qasper": "qa_f1_score",
        "multi_news": "qa_f1_score", "gov_report": "qa_f1_score", "triviaqa": "exact_match_score",
    }  # fmt: skip
    # The official protocol is unchanged: ROUGE-L for the summaries, F1 for TriviaQA.
    assert PROTOCOL_METRICS["official"] is TASK_METRICS
    assert TASK_METRICS["gov_report"] is rouge_l_score is TASK_METRICS["multi_news"]
    assert TASK_METRICS["triviaqa"] is qa_f1_score
    assert set(PROTOCOLS) == set(PROTOCOL_METRICS) == {"official", "paper"}
    assert PROTOCOLS["paper"].tasks == PAPER_TASKS and PROTOCOLS["paper"].context == 32768
    assert PROTOCOLS["official"].context is None
    with pytest.raises(DashKVError, match="does not score 'trec'"):
        task_metric("trec", "paper")
    with pytest.raises(DashKVError, match="unknown LongBench protocol 'nope'"):
        task_metric("hotpotqa", "nope")


def test_score_prediction_under_each_protocol():
    # TriviaQA keeps the first line under both. "Collins piloted it" against "Michael Collins":
    # official F1: 1 shared token, P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4; paper EM: 0.
    few_shot = "Collins piloted it\nPassage: Aruba is an island."
    answers = ["Michael Collins", "Mike Collins"]
    assert score_prediction("triviaqa", few_shot, answers) == pytest.approx(0.4)
    assert score_prediction("triviaqa", few_shot, answers, protocol="paper") == 0.0
    # The best answer counts: "collins" alone matches no alias exactly, "Mike Collins." does.
    assert score_prediction("triviaqa", "Mike Collins.\nmore", answers, protocol="paper") == 1.0
    # GovReport: official ROUGE-L 0.8 (test_rouge_l_score); paper F1 on normalised tokens
    # [cat sat on mat] and [cat lay on mat]: 3 shared, P = R = 3/4, F1 = 0.75.
    pred, truth = "the cat sat on the mat", "the cat lay on the mat"
    assert score_prediction("gov_report", pred, [truth]) == pytest.approx(0.8)
    assert score_prediction("gov_report", pred, [truth], protocol="paper") == pytest.approx(0.75)
    with pytest.raises(DashKVError, match="paper protocol does not score 'lcc'"):
        score_prediction("lcc", "x", ["x"], protocol="paper")


def test_normalize_zh_answer():
    assert normalize_zh_answer("你好，世界！ OK") == "你好世界ok"


def test_chinese_metrics_say_they_need_jieba(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # importing it now raises ImportError
    with pytest.raises(DashKVError, match="pip install jieba"):
        qa_f1_zh_score("北京", "北京")


def test_score_prediction_takes_the_best_answer_and_the_first_line():
    assert score_prediction("hotpotqa", "James Lovell", ["Jim Lovell", "James Lovell"]) == 1.0
    # trec keeps the first line only: "City" (1.0); the whole text also names Date (0.5).
    trec = "\nCity\nQuestion: When did Apollo 8 launch ?\nType: Date"
    assert score_prediction("trec", trec, ["City"], ["City", "Date"]) == 1.0
    # hotpotqa keeps it all: "lovell more" against "lovell": P = 1/2, R = 1, F1 = 2/3.
    assert score_prediction("hotpotqa", "Lovell\nmore", ["Lovell"]) == pytest.approx(2 / 3)
    with pytest.raises(DashKVError, match="unknown LongBench task"):
        score_prediction("hotpot", "x", ["x"])
    with pytest.raises(DashKVError, match="all_classes"):
        score_prediction("trec", "City", ["City"], None)


def test_mean_score_is_reported_x100_to_two_places():
    assert mean_score([1.0, 0.5, 0.0]) == 50.0
    assert mean_score([1 / 3]) == 33.33
    with pytest.raises(DashKVError):
        mean_score([])


# Templates and data ---------------------------------------------------------------------------


def _fingerprint(table: dict) -> str:
    return hashlib.sha256(
        json.dumps(table, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def test_templates_and_lengths_are_the_official_ones():
    # SHA-256 of THUDM/LongBench's LongBench/config/dataset2prompt.json and dataset2maxlen.json
    # (json.load, then dumped as above), taken from that repository.
    assert _fingerprint(PROMPTS) == (
        "e7d865d712fe45e2455f5e864ac474001d7758d68d349e76ffbcdd382483358f"
    )
    assert _fingerprint(MAX_NEW_TOKENS) == (
        "39a79d9491ead3dc8bcea6dbd8b963b29248eb4c344dde1e176b0a58b4e758a9"
    )
    assert PROMPTS["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert set(TASK_METRICS) == set(PROMPTS) == set(MAX_NEW_TOKENS) >= NO_CHAT_TASKS


def test_load_the_fixture():
    for task in FIXTURE_TASKS + PAPER_FIXTURE_TASKS:
        samples = load_longbench(task, FIXTURE)
        assert len(samples) == 2
        assert all(set(FIELDS) <= set(s) and s["dataset"] == task for s in samples)
    assert load_longbench("trec", FIXTURE)[0]["all_classes"][:2] == ["Food", "Date"]


def test_bad_data_is_refused(tmp_path, monkeypatch):
    with pytest.raises(DashKVError, match="unknown LongBench task 'hotpot'"):
        load_longbench("hotpot", FIXTURE)
    with pytest.raises(DashKVError, match="no such LongBench data folder"):
        load_longbench("trec", tmp_path / "missing")
    with pytest.raises(DashKVError, match=r"no musique.jsonl .*hotpotqa"):
        load_longbench("musique", FIXTURE)
    (tmp_path / "trec.jsonl").write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(DashKVError, match="not LongBench's format"):
        load_longbench("trec", tmp_path)
    (tmp_path / "lcc.jsonl").write_text("{not json\n")
    with pytest.raises(DashKVError, match="lcc.jsonl:1 is not JSON"):
        load_longbench("lcc", tmp_path)
    bad_answers = {field: "x" for field in FIELDS} | {"answers": "x", "all_classes": None}
    (tmp_path / "samsum.jsonl").write_text(json.dumps(bad_answers) + "\n")
    with pytest.raises(DashKVError, match="answers must be a non-empty list"):
        load_longbench("samsum", tmp_path)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub")

    monkeypatch.setattr(longbench.datasets, "load_dataset", offline)
    with pytest.raises(DashKVError, match="data.zip"):
        load_longbench("hotpotqa")


# Prompts --------------------------------------------------------------------------------------


def test_prompts_follow_the_official_templates(smollm2):
    model, tokenizer = smollm2
    qa = load_longbench("hotpotqa", FIXTURE)[0]
    prompt = build_prompt("hotpotqa", qa, tokenizer, 8000, model.chat_template)
    # A chat task: the template's text inside the model's chat turn.
    head = (
        "<|im_start|>user\nAnswer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are given passages.\n"
    )
    assert head + qa["context"] + "\n\n" in prompt
    assert prompt.endswith(f"Question: {qa['input']}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    # A few-shot task: the template alone, no chat turn.
    trec = load_longbench("trec", FIXTURE)[0]
    assert build_prompt("trec", trec, tokenizer, 8000, model.chat_template) == (
        "Please determine the type of the question below. Here are some examples of questions."
        f"\n\n{trec['context']}\n{trec['input']}"
    )


def test_long_prompts_keep_their_head_and_tail(smollm2):
    _, tokenizer = smollm2
    qa = load_longbench("hotpotqa", FIXTURE)[0]
    full = PROMPTS["hotpotqa"].format(**qa)
    assert len(tokenizer.encode(full).ids) > 300
    cut = truncate_middle(full, tokenizer, 60)
    assert len(tokenizer.encode(cut).ids) <= 60
    assert cut.startswith("Answer the question based on the given passages.")
    assert cut.endswith(f"Question: {qa['input']}\nAnswer:")
    assert "Saturn V" in full and "Saturn V" not in cut  # from the middle passage
    assert truncate_middle(full, tokenizer, 10_000) == full
    with pytest.raises(DashKVError):
        truncate_middle(full, tokenizer, 1)


def test_runner_truncates_to_the_context_less_the_generation(smollm2, monkeypatch):
    model, tokenizer = smollm2
    prompts = []

    def fake_generate(model, tokenizer, prompt, **kwargs):
        prompts.append((prompt, kwargs["max_new_tokens"]))
        return "James Lovell"

    monkeypatch.setattr(longbench, "generate", fake_generate)
    # Leave 150 tokens of the 8192 for the prompt: the chat prompt must be cut to fit.
    new_tokens = model.config.max_position - 150
    report = run_longbench(
        model, tokenizer, ["hotpotqa"], data=FIXTURE, max_new_tokens=new_tokens, progress=False
    )
    samples = report["tasks"]["hotpotqa"]["samples"]
    assert [s["truncated"] for s in samples] == [True, True]
    for (prompt, max_new), sample in zip(prompts, samples, strict=True):
        assert max_new == new_tokens
        assert sample["prompt_tokens"] == len(tokenizer.encode(prompt).ids)
        assert sample["prompt_tokens"] + new_tokens <= model.config.max_position
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("assistant\n")
    assert samples[0]["score"] == 100.0  # the fake answer is the first sample's answer


def test_paper_protocol_runs_its_six_tasks_and_scores_both(smollm2, monkeypatch):
    model, tokenizer = smollm2
    sent = []

    def fake_generate(model, tokenizer, prompt, **kwargs):
        sent.append(prompt)
        return "Michael Collins"

    monkeypatch.setattr(longbench, "generate", fake_generate)
    # No tasks given: the protocol's own six, in the paper's order.
    report = run_longbench(
        model, tokenizer, data=FIXTURE, protocol="paper", max_new_tokens=8, progress=False
    )
    assert report["protocol"] == "paper" and list(report["tasks"]) == list(PAPER_TASKS)
    assert report["context"] == model.config.max_position  # the paper's 32K, capped at 8K
    trivia = report["tasks"]["triviaqa"]
    assert trivia["metric"] == "exact_match_score"
    assert trivia["metrics"] == {"official": "qa_f1_score", "paper": "exact_match_score"}
    # "Michael Collins" is the first sample's answer (100 under both), not the second's (0).
    assert [s["scores"] for s in trivia["samples"]] == [
        {"official": 100.0, "paper": 100.0}, {"official": 0.0, "paper": 0.0}
    ]  # fmt: skip
    assert trivia["score"] == trivia["scores"]["paper"] == 50.0
    for task, result in report["tasks"].items():
        assert result["metric"] == PAPER_TASK_METRICS[task].__name__
        assert result["metrics"]["official"] == TASK_METRICS[task].__name__
        for sample in result["samples"]:
            answers = sample["answers"]
            paper = score_prediction(task, "Michael Collins", answers, protocol="paper")
            official = score_prediction(task, "Michael Collins", answers)
            assert sample["score"] == sample["scores"]["paper"] == round(100 * paper, 2)
            assert sample["scores"]["official"] == round(100 * official, 2)
            assert sample["budget_tokens"] is None  # full attention
    for protocol in ("paper", "official"):
        task_scores = [r["scores"][protocol] for r in report["tasks"].values()]
        mean = sum(task_scores) / len(task_scores)
        assert report["averages"][protocol] == pytest.approx(mean, abs=0.01)
    assert report["average"] == report["averages"]["paper"]
    # Chat templates where LongBench uses them: every task but the few-shot triviaqa.
    assert len(sent) == 12
    assert [p.startswith("<|im_start|>system") for p in sent] == [True] * 10 + [False] * 2

    # A context of 300 tokens: every prompt cut in the middle to 300 less the generation.
    sent.clear()
    report = run_longbench(
        model, tokenizer, ["qasper"], data=FIXTURE, protocol="paper", context=300,
        max_new_tokens=8, progress=False,
    )  # fmt: skip
    assert report["context"] == 300
    samples = report["tasks"]["qasper"]["samples"]
    assert all(s["truncated"] and s["prompt_tokens"] + 8 <= 300 for s in samples)
    assert all(p.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n") for p in sent)


def test_official_protocol_reports_the_papers_scores_where_it_has_them(smollm2, monkeypatch):
    model, tokenizer = smollm2
    monkeypatch.setattr(longbench, "generate", lambda *args, **kwargs: "James Lovell")
    report = run_longbench(
        model, tokenizer, ["hotpotqa", "trec"], data=FIXTURE, max_new_tokens=8, progress=False
    )
    assert report["protocol"] == "official"
    hotpotqa, trec = report["tasks"]["hotpotqa"], report["tasks"]["trec"]
    assert hotpotqa["metric"] == "qa_f1_score" and set(hotpotqa["scores"]) == {"official", "paper"}
    assert trec["metrics"] == {"official": "classification_score"}  # the paper has no trec
    assert report["averages"]["paper"] is None  # it would skip trec
    assert report["average"] == report["averages"]["official"]


def test_equal_bytes_gives_a_budget_method_dashkvs_bytes_per_sample(smollm2, monkeypatch):
    from dashkv_jax.attention.methods import equal_bytes_budget, make_attention, method_hasher

    model, tokenizer = smollm2
    backends = []

    def fake_generate(model, tokenizer, prompt, **kwargs):
        backends.append((len(tokenizer.encode(prompt).ids) + kwargs["max_new_tokens"], kwargs))
        return "James Lovell"

    monkeypatch.setattr(longbench, "generate", fake_generate)
    common = {"data": FIXTURE, "attention": "streaming", "budget": "1/4", "max_new_tokens": 8,
              "progress": False}  # fmt: skip
    report = run_longbench(model, tokenizer, ["hotpotqa"], equal_bytes=True, **common)
    assert report["equal_bytes"] is True
    dashkv = method_hasher("dashkv", model, None)
    samples = report["tasks"]["hotpotqa"]["samples"]
    for (context, kwargs), sample in zip(backends, samples, strict=True):
        # DASH-KV at a quarter of this sample's context, tier 2 at its hasher's 1/64.
        tokens, approx = -(-context // 4), -(-context // 64)
        reference = make_attention("dashkv", tokens, model, hasher=dashkv, tier2=approx)
        matched = equal_bytes_budget("streaming", model, reference, context)
        assert kwargs["attention"].budget == sample["budget_tokens"] == matched > tokens
    backends.clear()
    report = run_longbench(model, tokenizer, ["hotpotqa"], **common)  # equal tokens
    assert report["equal_bytes"] is False
    samples = report["tasks"]["hotpotqa"]["samples"]
    for (context, kwargs), sample in zip(backends, samples, strict=True):
        assert sample["budget_tokens"] == -(-context // 4)
        assert kwargs["attention"] == "streaming" and kwargs["budget"] == str(-(-context // 4))
    # A floor under a fractional budget: a sample never reads fewer than `min_budget` tokens.
    backends.clear()
    report = run_longbench(model, tokenizer, ["hotpotqa"], min_budget=400, **common)
    assert [s["budget_tokens"] for s in report["tasks"]["hotpotqa"]["samples"]] == [400, 400]
    assert [kwargs["budget"] for _, kwargs in backends] == ["400", "400"]


# The runner on the real model -----------------------------------------------------------------


def _check_report(report: dict, tasks, attention: str) -> None:
    assert json.loads(json.dumps(report)) == report  # JSON-able as is
    assert report["attention"] == attention and list(report["tasks"]) == list(tasks)
    for task, result in report["tasks"].items():
        assert result["metric"] == PROTOCOL_METRICS[report["protocol"]][task].__name__
        assert 0.0 <= result["score"] <= 100.0
        scores = [s["score"] for s in result["samples"]]
        assert all(0.0 <= s <= 100.0 for s in scores)
        assert result["score"] == pytest.approx(sum(scores) / len(scores), abs=0.01)
        for sample in result["samples"]:
            assert isinstance(sample["prediction"], str) and sample["answers"]
            assert sample["truncated"] is False and sample["prompt_tokens"] > 0
    task_scores = [r["score"] for r in report["tasks"].values()]
    assert report["average"] == pytest.approx(sum(task_scores) / len(task_scores), abs=0.01)


def test_run_full_attention_on_the_fixture(smollm2, monkeypatch):
    model, tokenizer = smollm2
    prompts = {}
    real_generate = longbench.generate

    def recording_generate(model, tokenizer, prompt, **kwargs):
        prompts.setdefault(kwargs["max_new_tokens"], []).append(prompt)
        return real_generate(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(longbench, "generate", recording_generate)
    report = run_longbench(
        model, tokenizer, FIXTURE_TASKS, data=FIXTURE, max_new_tokens=8, progress=False
    )
    _check_report(report, FIXTURE_TASKS, "full")
    assert report["chat"] is True and report["budget"] is None
    assert all(len(r["samples"]) == 2 for r in report["tasks"].values())
    # The model got the official prompts: chat-wrapped for hotpotqa and gov_report, bare for
    # trec and lcc, in task order.
    sent = prompts[8]
    assert len(sent) == 8
    assert all(p.startswith("<|im_start|>system") for p in sent[:4])
    assert "You are given a report by a government agency." in sent[2]
    trec = load_longbench("trec", FIXTURE)
    assert sent[4:6] == [PROMPTS["trec"].format(**s) for s in trec]
    lcc = load_longbench("lcc", FIXTURE)
    assert sent[6:] == [PROMPTS["lcc"].format(**s) for s in lcc]


def test_run_a_budgeted_method_on_the_fixture(smollm2):
    model, tokenizer = smollm2
    tasks = ("hotpotqa", "lcc")
    report = run_longbench(
        model,
        tokenizer,
        tasks,
        data=FIXTURE,
        attention="streaming",
        budget="80",
        limit=1,
        max_new_tokens=8,
        progress=False,
    )
    _check_report(report, tasks, "streaming")
    assert report["budget"] == "80"
    assert all(len(r["samples"]) == 1 for r in report["tasks"].values())


def test_run_the_paper_protocol_on_the_fixture(smollm2):
    model, tokenizer = smollm2
    tasks = ("qasper", "triviaqa")
    report = run_longbench(
        model, tokenizer, tasks, protocol="paper", data=FIXTURE, limit=1, max_new_tokens=8,
        progress=False,
    )  # fmt: skip
    _check_report(report, tasks, "full")
    assert report["tasks"]["triviaqa"]["metric"] == "exact_match_score"
    for result in report["tasks"].values():
        assert set(result["scores"]) == {"official", "paper"}
        assert all(0.0 <= s["scores"]["official"] <= 100.0 for s in result["samples"])


def test_runner_refuses_bad_options(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(DashKVError, match="unknown LongBench protocol 'nope'"):
        run_longbench(model, tokenizer, ["hotpotqa"], data=FIXTURE, protocol="nope")
    # The paper gives trec no metric: refused before any sample is read.
    with pytest.raises(DashKVError, match="paper protocol does not score 'trec'"):
        run_longbench(model, tokenizer, ["hotpotqa", "trec"], data=FIXTURE, protocol="paper")
    with pytest.raises(DashKVError, match="unknown LongBench task"):
        run_longbench(model, tokenizer, ["hotpotqa", "nope"], data=FIXTURE)
    with pytest.raises(DashKVError, match="no LongBench tasks"):
        run_longbench(model, tokenizer, [], data=FIXTURE)
    with pytest.raises(DashKVError, match="unknown attention method 'nope'"):
        run_longbench(model, tokenizer, ["trec"], data=FIXTURE, attention="nope")
    with pytest.raises(DashKVError, match="limit"):
        run_longbench(model, tokenizer, ["trec"], data=FIXTURE, limit=0)
    # A budget that leaves nothing beyond the sinks and window fails on the first sample.
    with pytest.raises(DashKVError, match="trec sample .*budget"):
        run_longbench(
            model,
            tokenizer,
            ["trec"],
            data=FIXTURE,
            attention="streaming",
            budget="8",
            progress=False,
        )

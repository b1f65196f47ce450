"""experiments/paper_tables.py end to end in its quick mode on the LongBench fixture (the bundled
model and its shipped hashers), the paper's numbers it copies, its refusals; and the LongBench
part of experiments/eval.py it runs (the paper's protocol, its tables)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import eval as evaluation  # noqa: E402
import paper_tables  # noqa: E402

from dashkv_jax.evaluation.longbench import PAPER_TASKS  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "longbench"

# The paper's numbers, as ../shared/DESIGN.md section 2 gives them.
PAPER_TABLE2 = {  # method: (Recall@100 %, KL, latency ms)
    "simhash": (8.91, 3.20, 28),
    "dashkv-symmetric": (68.28, 1.32, 38),
    "dashkv": (86.06, 0.4054, 22),
}
PAPER_AVERAGES = {  # model: (DASH-KV, full)
    "Qwen2-7B-Instruct": (38.73, 38.71),
    "Llama-3.1-8B-Instruct": (42.43, 42.70),
    "Qwen2.5-14B-Instruct": (42.92, 42.26),
}


def _main(argv) -> int:
    try:
        return paper_tables.main(argv)
    except SystemExit as exit:  # argparse's refusals
        return exit.code


def test_the_papers_numbers_are_the_papers():
    paper = paper_tables.PAPER
    rows = paper["table2"]["rows"]
    assert {r["method"]: (r["recall_at_100"], r["kl"], r["latency_ms"]) for r in rows} == (
        PAPER_TABLE2
    )
    assert [r["label"] for r in rows] == ["naive LSH", "symmetric learned", "DASH-KV"]
    averages = paper["table1"]["averages"]
    assert {r["model"]: (r["dashkv"], r["full"]) for r in averages} == PAPER_AVERAGES
    assert paper["table1"]["tasks"] == list(PAPER_TASKS)
    # Marked as another setting than ours.
    assert all(word in paper["setting"] for word in ("32K", "GPU", "not this project's"))
    assert "DESIGN.md section 2" in paper["source"]


def test_quick_tables_on_the_fixture(tmp_path, capsys):
    # Two Table 1 methods keep it to minutes; streaming shows --equal-bytes reaching eval.py.
    argv = ["--quick", "--methods", "full,streaming", "--equal-bytes",
            "--longbench-data", str(FIXTURE), "--out", str(tmp_path)]  # fmt: skip
    assert _main(argv) == 0
    tables = json.loads((tmp_path / "paper_tables.json").read_text())
    assert set(tables) >= {"paper", "ours", "table1", "table2", "markdown", "plots"}

    # The paper's numbers, beside ours in each table and marked as the paper's.
    assert tables["paper"] == json.loads(json.dumps(paper_tables.PAPER))
    assert tables["table1"]["paper"] == tables["paper"]["table1"]
    assert tables["table2"]["paper"] == tables["paper"]["table2"]
    rows = tables["table2"]["paper"]["rows"]
    assert {r["method"]: (r["recall_at_100"], r["kl"], r["latency_ms"]) for r in rows} == (
        PAPER_TABLE2
    )

    ours = tables["ours"]
    assert ours["model"] == "smollm2-135m-instruct" and ours["context"] == 512
    assert ours["budget"] == "1/4" and ours["equal_bytes"] is True and "cores" in ours["machine"]

    # Table 2: the three hashers, each measured at the context, on this machine.
    t2 = tables["table2"]["ours"]
    assert [r["method"] for r in t2["rows"]] == list(PAPER_TABLE2)
    assert t2["context"] == 512 and t2["budget_tokens"] == 128 and t2["queries"] == 16
    for row in t2["rows"]:
        assert 0 <= row["recall_at_100"] <= 100 and row["kl"] >= 0, row
        assert row["latency_ms"] > 0 and row["exact_tokens"] > 68 and row["bytes"] > 0, row
        assert len(t2["latency"][row["method"]]["steps_ms"]) == 3
    assert t2["full_latency_ms"] > 0
    assert set(t2["recall_report"]["methods"]) == set(PAPER_TABLE2)

    # Table 1: experiments/eval.py's sections, LongBench under the paper's protocol.
    t1 = tables["table1"]["ours"]
    longbench = t1["longbench"]
    assert t1["longbench_skipped"] is None
    assert [(r["method"], r["task"]) for r in longbench] == [
        (m, t) for m in ("full", "streaming") for t in PAPER_TASKS
    ]
    for row in longbench:
        em = row["task"] == "triviaqa"
        assert row["protocol"] == "paper" and row["samples"] == 1
        assert row["metric"] == ("exact_match_score" if em else "qa_f1_score")
        assert set(row["scores"]) == {"official", "paper"} and 0 <= row["score"] <= 100
    assert set(t1["longbench_averages"]) == {"full", "streaming"}
    assert set(t1["longbench_averages"]["full"]) == {"official", "paper"}
    # --equal-bytes reached every section: streaming reads DASH-KV's bytes, more than its 128
    # tokens at 1/4 of 512.
    perplexity = {r["method"]: r for r in t1["perplexity"]}
    assert set(perplexity) == {"full", "streaming"}
    assert all((r["prompt"], r["scored"]) == (448, 64) for r in t1["perplexity"])
    assert perplexity["streaming"]["budget_tokens"] > 128
    assert all(r["budget_tokens"] > 128 for r in longbench if r["method"] == "streaming")
    assert {r["method"] for r in t1["synthetic"]} == {"full", "streaming"}
    results = json.loads(Path(t1["results"]).read_text())
    assert results["config"]["equal_bytes"] is True
    assert results["config"]["longbench_protocol"] == "paper"

    markdown = (tmp_path / "paper_tables.md").read_text()
    assert markdown == tables["markdown"]
    assert "| paper | naive LSH | 8.91 | 3.2000 | 28 |" in markdown
    assert "| paper | DASH-KV | 86.06 | 0.4054 | 22 |" in markdown
    assert "| paper | Llama-3.1-8B-Instruct | 32K, GPU | 42.70 | 42.43 |" in markdown
    assert "| ours | dashkv | " in markdown and "this CPU, 512 |" in markdown
    assert "| ours | smollm2-135m-instruct | 8K, this machine | " in markdown  # paper: 32K
    assert "LongBench (paper protocol, x100)" in markdown
    for plot in ("table1.png", "table2.png", "table1/longbench.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_table1_without_longbench_data_says_it_needs_it(tmp_path, monkeypatch):
    calls = []

    def fake_run(config, sections, out, resume=False):  # eval.py's run, minus the hours
        calls.append((config, sections, out))
        return {"model": config.model, "config": {}, "perplexity": [], "synthetic": [],
                "plots": []}  # fmt: skip

    monkeypatch.setattr(paper_tables.evaluation, "run", fake_run)
    settings = paper_tables.Settings(equal_bytes=True, context=4096)
    t1 = paper_tables.table1(settings, tmp_path)
    ((config, sections, out),) = calls
    assert sections == ["perplexity", "synthetic"] and out == tmp_path / "table1"
    assert config.equal_bytes is True and config.budgets == ("1/32",)
    assert config.perplexity_tokens == 4096 and config.synthetic_lengths == (4096 - 192,)
    assert config.perplexity_prompt == 4096 - 512  # the last 512 scored after a prompt
    assert t1["longbench"] is None and "--longbench-data" in t1["longbench_skipped"]
    tables = {"ours": {"model": "m", "machine": "here", "context": 4096, "budget": "1/32",
                       "equal_bytes": True}, "table1": {"ours": t1}}  # fmt: skip
    markdown = paper_tables.markdown(tables)
    assert "| ours | m | - | skipped: needs the LongBench data: --longbench-data DIR" in markdown
    assert "| paper | Qwen2-7B-Instruct | 32K, GPU | 38.71 | 38.73 |" in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "table3"], "unknown section(s) table3"),
        (["--budget", "abc"], "budget 'abc' is neither"),
        (["--context", "100"], "--context must be at least"),
        (["--context", "many"], "argument --context: invalid int value"),
        (["--queries", "0"], "--queries must be >= 1"),
        (["--methods", "full,nope"], "unknown method(s) nope"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--longbench-data", "/nonexistent/longbench"], "no such LongBench data folder"),
        (["--longbench-data", str(FIXTURE / "..")], "no narrativeqa.jsonl"),
        (["--sections", "table2", "--context", "9000"], "exceeds the model's context of 8192"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert _main([*argv, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paper_tables: error: "), captured.err
    assert message in lines[0] and captured.out == ""


# experiments/eval.py's LongBench part ---------------------------------------------------------


def test_eval_refuses_a_task_the_protocol_does_not_score(tmp_path, capsys):
    argv = ["--sections", "longbench", "--longbench-data", str(FIXTURE),
            "--longbench-protocol", "paper", "--longbench-tasks", "hotpotqa,trec",
            "--out", str(tmp_path)]  # fmt: skip
    assert evaluation.main(argv) == 2
    assert "paper protocol does not score 'trec'" in capsys.readouterr().err


def test_eval_longbench_tables_show_both_protocols():
    rows = [
        {"method": m, "task": t, "protocol": "paper", "metric": metric, "score": paper,
         "metrics": {"official": official_metric, "paper": metric},
         "scores": {"official": official, "paper": paper}}
        for m, t, metric, official_metric, paper, official in [
            ("full", "gov_report", "qa_f1_score", "rouge_l_score", 20.0, 10.0),
            ("full", "triviaqa", "exact_match_score", "qa_f1_score", 50.0, 60.0),
            ("dashkv", "gov_report", "qa_f1_score", "rouge_l_score", 30.0, 12.0),
        ]
    ]  # fmt: skip
    lines = evaluation.longbench_markdown(rows, ["full", "dashkv"])
    text = "\n".join(lines)
    assert "## LongBench (paper protocol, x100)" in text
    assert "| method | gov_report (F1) | triviaqa (EM) | average |" in text
    assert "| full | 20.00 | 50.00 | 35.00 |" in text
    assert "| dashkv | 30.00 | not run | - |" in text  # an incomplete row has no average
    assert "under the official protocol" in text
    assert "| method | gov_report (ROUGE-L) | triviaqa (F1) | average |" in text
    assert "| full | 10.00 | 60.00 | 35.00 |" in text
    # Rows of an older run (official metric and score only) still make a table.
    old = [{"method": "full", "task": "trec", "metric": "classification_score", "score": 40.0}]
    assert "| full | 40.00 | 40.00 |" in "\n".join(evaluation.longbench_markdown(old, ["full"]))

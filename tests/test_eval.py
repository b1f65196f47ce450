"""The evaluation and benchmark launchers end to end in reduced configurations."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import bench_decode  # noqa: E402
import eval as evaluation  # noqa: E402


def test_eval_quick_preset_writes_results_tables_and_plots(tmp_path, capsys):
    assert evaluation.main(["--preset", "quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    methods = evaluation.PRESETS["quick"].methods
    perplexity = results["perplexity"]
    assert {r["method"] for r in perplexity} == set(methods)
    full = next(r["perplexity"] for r in perplexity if r["method"] == "full")
    for r in perplexity:
        assert r["tokens"] == 512 and r["perplexity"] > 1
        # Budgets of 1/4 and 1/2 of 512 tokens: the oracle stays within 5% of full attention.
        if r["method"] == "oracle":
            assert r["perplexity"] < full * 1.05, r
        if r["method"] == "dashkv":  # exact tokens over positions and layers, and tier 2's
            assert 68 < r["exact_tokens"] < r["tokens"] and r["approx_tokens"] > 0, r
            assert 0 < r["bytes"] < next(x["bytes"] for x in perplexity if x["method"] == "full")
    synthetic = results["synthetic"]
    assert {r["method"] for r in synthetic} == set(methods)
    assert all(0 <= r["score"] <= 1 for r in synthetic)
    recall = results["recall"]
    assert {r["method"] for r in recall} == set(methods) - {"full"}
    assert all(0 <= r["recall_at_100"] <= 1 and r["kl"] >= 0 for r in recall)
    markdown = (tmp_path / "results.md").read_text()
    assert "Decode-mode perplexity" in markdown and "| dashkv |" in markdown
    for plot in ("perplexity_vs_budget.png", "recall_vs_budget.png", "needle_heatmap.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_synthetic_table_scores_methods_only_where_full_attention_answers():
    config = dataclasses.asdict(
        dataclasses.replace(evaluation.PRESETS["quick"], methods=("full", "snapkv", "dashkv"))
    )
    scores = {  # (method, length) -> scores at depths 0.1, 0.5, 0.9
        ("full", 4096): (1, 1, 1), ("snapkv", 4096): (0, 0, 1), ("dashkv", 4096): (1, 1, 1),
        ("full", 8000): (0, 0, 1), ("snapkv", 8000): (0, 0, 1), ("dashkv", 8000): (1, 1, 0),
    }  # fmt: skip
    rows = [
        {"task": "passkey", "length": n, "depth": d, "method": m, "score": float(s)}
        for (m, n), values in scores.items()
        for d, s in zip((0.1, 0.5, 0.9), values, strict=True)
    ]
    rows += [{**r, "length": 16384, "score": 0.0} for r in rows if r["length"] == 8000]
    table = evaluation.markdown({"model": "m", "config": config, "synthetic": rows, "plots": []})
    assert f"budget {config['generation_budget']} of each prompt" in table
    # At 8000 full attention answers at one depth of three: only that depth counts for others.
    assert "| full | 1.00 | 0.33 | 0.00 |" in table
    assert "| snapkv | 0.33 [3/3] | 1.00 [1/3] | (full fails) |" in table
    assert "| dashkv | 1.00 [3/3] | 0.00 [1/3] | (full fails) |" in table


def test_eval_runs_longbench_from_a_local_folder(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "longbench"
    argv = ["--preset", "quick", "--sections", "longbench", "--methods", "full,dashkv",
            "--longbench-data", str(fixture), "--out", str(tmp_path)]  # fmt: skip
    assert evaluation.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["longbench"]
    assert [(r["method"], r["task"]) for r in rows] == [
        ("full", "hotpotqa"), ("full", "trec"), ("dashkv", "hotpotqa"), ("dashkv", "trec")
    ]  # fmt: skip
    assert all(0 <= r["score"] <= 100 and r["samples"] == 1 for r in rows)
    assert "## LongBench" in (tmp_path / "results.md").read_text()


def test_eval_resume_runs_only_new_rows_and_refuses_other_settings(tmp_path, capsys):
    argv = ["--preset", "quick", "--sections", "perplexity", "--methods", "full,quest",
            "--out", str(tmp_path)]  # fmt: skip
    assert evaluation.main([*argv, "--budgets", "1/2"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())["perplexity"]
    assert evaluation.main([*argv, "--budgets", "1/4,1/2", "--resume"]) == 0
    second = json.loads((tmp_path / "results.json").read_text())["perplexity"]
    assert [(r["method"], r["budget"]) for r in second] == [
        ("full", None), ("quest", "1/4"), ("quest", "1/2")
    ]  # fmt: skip
    # Kept rows are the earlier run's, timings included; the new one was measured now.
    assert second[0] == first[0] and second[2] == first[1]
    assert second[1]["perplexity"] > 1
    results = json.loads((tmp_path / "results.json").read_text())
    results["config"]["perplexity_tokens"] = 1024
    (tmp_path / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert evaluation.main([*argv, "--resume"]) == 2
    assert "perplexity_tokens" in capsys.readouterr().err


def test_eval_perplexity_after_a_prompt(tmp_path, capsys):
    """SnapKV compresses the 448-token prompt to its budget: unlike teacher-forced, it no longer
    equals full attention on the 64 tokens scored after it."""
    argv = ["--preset", "quick", "--sections", "perplexity", "--methods", "full,snapkv",
            "--budgets", "1/4", "--perplexity-prompt", "448", "--out", str(tmp_path)]  # fmt: skip
    assert evaluation.main(argv) == 0
    full, snapkv = json.loads((tmp_path / "results.json").read_text())["perplexity"]
    assert (full["prompt"], full["scored"], snapkv["scored"]) == (448, 64, 64)
    assert snapkv["perplexity"] != pytest.approx(full["perplexity"], rel=1e-3)
    assert snapkv["bytes"] < full["bytes"]
    assert "the 64 after a 448-token prompt" in (tmp_path / "results.md").read_text()
    assert evaluation.main([*argv[:-2], "--perplexity-prompt", "511", "--out", str(tmp_path)]) == 2
    assert "leaves nothing to score" in capsys.readouterr().err


def test_eval_refuses_unknown_methods_and_sections(tmp_path, capsys):
    assert evaluation.main(["--methods", "full,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert evaluation.main(["--sections", "vibes", "--out", str(tmp_path)]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert evaluation.main(["--sections", "longbench", "--out", str(tmp_path)]) == 2
    assert "--longbench-data" in capsys.readouterr().err


def test_bench_decode_prints_one_json_list(tmp_path):
    command = [
        sys.executable, str(ROOT / "experiments" / "bench_decode.py"), "--lengths", "1024,2048",
        "--budget", "1/8", "--repeats", "1", "--layers", "3", "--cache-layers", "3", "--json",
        "--out", str(tmp_path / "bench"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(done.stdout)
    assert [r["n"] for r in rows] == [1024, 2048]
    for row in rows:
        assert (
            row["dense_ms"] > 0 and row["dashkv_ms"] > 0 and row["budget_tokens"] == row["n"] // 8
        )
        assert row["tier2_tokens"] == row["n"] // 64 and row["exact_tokens"] == row["n"] // 8
        assert row["layers"] == row["cache_layers"] == 3
        assert 0 < row["dashkv_floor_ms"] < row["dense_floor_ms"]
    assert "N" in done.stderr  # the table goes to stderr with --json
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and (tmp_path / "bench.png").is_file()
    assert saved["read_bandwidth_gb_s"] > 0 and "huge pages" in saved["memory"]


def test_bench_kernels_sparse_rows_with_their_control(tmp_path):
    """bench_kernels' sparse rows: the step over scattered slots, over consecutive ones (the
    control), floors from bench_decode's probe, the memory setting recorded."""
    command = [
        sys.executable, str(ROOT / "experiments" / "bench_kernels.py"), "--quick",
        "--sparse-only", "--json", str(tmp_path / "kernels.json"),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["read_probe_gbps"] > 0 and "huge pages" in saved["machine"]["memory"]
    (row,) = saved["sparse_rows"]
    assert row["n"] == 16384 and row["floor_seconds"] > 0
    assert row["seconds"]["gathered_step"] > 0 and row["seconds"]["gathered_step_consecutive"] > 0


def test_bench_decode_profile_lists_compiled_ops(tmp_path):
    command = [
        sys.executable, str(ROOT / "experiments" / "bench_decode.py"), "--profile",
        "--lengths", "2048", "--budget", "1/8", "--repeats", "1", "--layers", "2",
        "--out", str(tmp_path / "profile"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    (row,) = json.loads((tmp_path / "profile.json").read_text())["profile"]
    assert row["n"] == 2048 and 0 < len(row["ops"]) <= 20
    assert all(op["ms_per_layer"] > 0 and op["runs_per_layer"] > 0 for op in row["ops"])
    # Compiled ops only, not host frames or the Python dispatch.
    names = [op["op"] for op in row["ops"]]
    assert not any(name.startswith(("$", "PjitFunction")) for name in names)
    assert names[0] in done.stdout


def test_bench_model_times_a_capture_cold_and_warm(tmp_path, capsys):
    import bench_model

    out = tmp_path / "bench.json"
    bench_model.main(["--prefill", "", "--decode", "", "--capture", "1024", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["phase"] == "capture" and row["tokens"] == 1024
    assert row["cold_seconds"] > 0 and row["seconds"] > 0 and row["peak_rss_gb"] > 0
    assert "capture   1024 tokens" in capsys.readouterr().out
    # A window too short for the training layout is one line and exit 2, before the model loads.
    assert bench_model.main(["--prefill", "", "--decode", "", "--capture", "512"]) == 2
    assert "no eligible keys" in capsys.readouterr().err


def test_bench_decode_bundled_config_is_the_ggufs():
    import gguf

    from dashkv_jax.models import loaders

    reader = gguf.GGUFReader(loaders.bundled_gguf_path())
    names = {t.name for t in reader.tensors}
    config = loaders.gguf_config(
        loaders._gguf_metadata(reader), "output.weight" in names, "blk.0.attn_q.bias" in names
    )
    # Equal in every field that sets the cost of a step (names, token ids and eps do not).
    assert bench_decode.BUNDLED == dataclasses.replace(
        config, rms_norm_eps=1e-5, bos_token_id=None, eos_token_ids=(), name="llama"
    )


def test_bench_decode_stages(tmp_path):
    argv = ["--stages", "--lengths", "1024", "--budget", "1/4", "--repeats", "1"]
    assert bench_decode.main([*argv, "--out", str(tmp_path / "stages")]) == 0
    (row,) = json.loads((tmp_path / "stages.json").read_text())["stages"]
    # The stages are differences of one run's prefixes: they add up to the whole step.
    total = sum(row[f"{name}_ms"] for name in bench_decode.STAGES)
    assert total == pytest.approx(row["dashkv_ms"])
    assert row["dashkv_ms"] > 0 and row["dense_ms"] > 0 and row["budget_tokens"] == 256


def test_bench_decode_sweeps_the_dense_chunk(tmp_path, capsys):
    argv = ["--dense-chunks", "256,512", "--lengths", "2048", "--budget", "1/4", "--layers", "2"]
    assert bench_decode.main([*argv, "--repeats", "1", "--out", str(tmp_path / "chunks")]) == 0
    (row,) = json.loads((tmp_path / "chunks.json").read_text())["dense_chunks"]
    assert row["n"] == 2048 and set(row["ms_by_chunk"]) == {"256", "512"}
    assert all(ms > 0 for ms in row["ms_by_chunk"].values())
    assert "N = 2048: dense ms by chunk" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # one argparse line, no traceback
        bench_decode.main(["--dense-chunks", "big"])
    assert bad.value.code == 2 and "--dense-chunks" in capsys.readouterr().err
    assert bench_decode.main(["--dense-chunks", "0,512", "--lengths", "2048"]) == 2
    assert "must be >= 1 slot" in capsys.readouterr().err


def test_bench_decode_random_weights_end_to_end():
    args = bench_decode.argparse.Namespace(budget="1/4", tier2="1/8", e2e_steps=1)
    row = bench_decode.end_to_end(args, context=512, weights="random")
    assert row["weights"] == "random" and row["dense_tokens_per_s"] > 0
    assert row["dashkv_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--lengths", "1024,abc"],
        ["--lengths", "100"],
        ["--batch", "0"],
        ["--cache-layers", "1"],
        ["--lengths", "1024"],
    ],
)  # the last: budget 1/32 of 1024 leaves nothing beyond the sink and window tokens
def test_bench_decode_bad_input(argv, capsys):
    assert bench_decode.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_the_gpu_dense_baseline_computes_what_full_attention_does():
    """bench_decode's fused GPU baseline (Pallas's decode attention, here in interpret mode)
    reads its own cache layout [B, N, Hkv, D]: the same attention as `attend_all` over ours."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu import decode_attention

    from dashkv_jax.attention.full import KVCache, attend_all

    rng = np.random.default_rng(0)
    b, n, hkv, g, d = 1, 256, 3, 3, 64
    k, v = (rng.standard_normal((b, n, hkv, d), np.float32) for _ in range(2))
    q = rng.standard_normal((b, hkv * g, d), np.float32)
    cache = KVCache(
        k=jnp.asarray(k.transpose(0, 2, 1, 3))[None], v=jnp.asarray(v.transpose(0, 2, 1, 3))[None],
        lengths=jnp.array([n - 1], jnp.int32),
    )  # fmt: skip
    want = attend_all(cache, jnp.int32(0), jnp.asarray(q)[:, None])[:, 0]
    got = decode_attention.gqa(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_seq_len=jnp.array([n]),
        block_k=64, k_splits=2, interpret=True,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert bench_decode.fused_dense_steps(n, 1, 2) == {} or jax.default_backend() == "gpu"


def test_the_sandwich_is_the_fragile_layers_at_each_end():
    import layer_sensitivity

    # Median 0.1: with factor 2 the bound is 0.2; layers 0-1 and 9 exceed it from the ends.
    increase = [0.9, 0.5, 0.1, 0.3, 0.1, 0.05, 0.1, 0.1, 0.1, 0.4]
    assert layer_sensitivity.choose_sandwich(np.array(increase), 2.0) == (2, 1)
    assert layer_sensitivity.choose_sandwich(np.array([0.1] * 5), 2.0) == (0, 0)


def test_ablation_refuses_unknown_rows_and_a_missing_bt_hasher(capsys):
    import ablation

    assert ablation.main(["--rows", "full,magic"]) == 2
    assert "unknown row" in capsys.readouterr().err
    assert ablation.main(["--rows", "bt", "--context", "1024"]) == 2
    assert "--bt-hasher" in capsys.readouterr().err


def test_perplexity_gaps_counts_copies_and_refuses_a_context_past_the_models(capsys):
    import perplexity_gaps

    # Bigrams (5, 6) and (6, 7) recur: entries 3 and 4 score tokens that repeat them.
    ids = np.array([5, 6, 7, 5, 6, 7, 8])
    assert perplexity_gaps.copies(ids).tolist() == [False, False, False, True, True, False]
    assert perplexity_gaps.main(["--context", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["perplexity_gaps: error: context 100000 exceeds the model's context of 8192"]


def test_passkey_digits_scores_each_digit_and_refuses_a_prompt_past_the_context(tmp_path, capsys):
    import passkey_digits

    argv = ["--lengths", "1024", "--depths", "0.5", "--keys", "1", "--methods", "full,oracle",
            "--budget", "1/2", "--out", str(tmp_path)]  # fmt: skip
    assert passkey_digits.main(argv) == 0
    result = json.loads((tmp_path / "digits.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full", "oracle"} and result["split"] == "validation"
    for row in rows.values():  # five digits, each scored; the model reads 1K passkeys back
        assert len(row["nll"]) == len(row["right"]) == len(row["key"]) == 5
        assert all(row["right"]) and np.mean(row["nll"]) < 0.5, row
    assert "digit NLL" in capsys.readouterr().out
    assert passkey_digits.main(["--lengths", "9000", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err

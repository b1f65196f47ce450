"""The paper's retrieval metrics: hand-computed cases, the decode-path measurement, and
`dashkv recall` on real held-out text."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.methods import make_methods
from dashkv_jax.cli import main
from dashkv_jax.evaluation.recall import method_metrics
from dashkv_jax.hashing.retrieval import Budget, selection_metrics


def test_recall_at_100_by_hand():
    # 150 keys, 4..139 eligible (136 of them); attention grows with the index, so the 100 with
    # the most are keys 40..139. A tier 1 of the 50 closest: distance 1000 - j picks 90..139,
    # all of them top keys (Recall@100 = 50/100) and the oracle's top 50 (mass recall 1);
    # distance j picks 4..53, of which 40..53 are top keys: 14/100.
    j = jnp.arange(150)
    eligible = (j >= 4) & (j < 140)
    probs = jnp.where(eligible, j.astype(jnp.float32), 0.0)
    probs = probs / probs.sum()
    good = selection_metrics(probs, 1000 - j, eligible, k=50)
    np.testing.assert_allclose(good, [0.5, 1.0], rtol=1e-6)
    bad = selection_metrics(probs, j, eligible, k=50)
    assert bad[0] == pytest.approx(0.14)
    mass = probs[4:54].sum() / probs[90:140].sum()
    assert bad[1] == pytest.approx(float(mass), rel=1e-5)


def test_fewer_than_100_eligible_keys_all_count():
    probs = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(40)), jnp.float32)
    eligible = jnp.ones(40, bool)
    np.testing.assert_allclose(selection_metrics(probs, -probs, eligible, k=40)[0], 1.0)
    np.testing.assert_allclose(selection_metrics(probs, -probs, eligible, k=10)[0], 0.25)


def test_budget_size():
    assert Budget(1 / 16).size(2048) == 128


@pytest.fixture(scope="module")
def heldout_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(data.load_documents(split="heldout")["text"][:3]))
    return path


def test_decode_path_metrics_on_real_text(smollm2):
    """The oracle reads the top middle keys exactly: Recall@100 is 1 with room for 100, and its
    KL is what the tokens it leaves out carry; StreamingLLM's is larger."""
    model, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    ids = next(data.iter_token_windows(docs, tokenizer, 600, concatenate=True))
    methods = make_methods(model, ["oracle", "streaming"], 600, "200")  # 132 selected
    got = method_metrics(model, ids, methods, np.array([400, 500, 599]))
    oracle, streaming = got["oracle"], got["streaming"]
    assert oracle["recall_at_100"] == pytest.approx(1.0)
    assert 0 < oracle["kl"] < streaming["kl"] and streaming["recall_at_100"] < 0.9
    assert oracle["exact_tokens"] == 200 and oracle["approx_tokens"] == 0
    assert oracle["sparse_layers"] == list(range(1, 30))  # the default sandwich: layer 0 exact
    assert len(oracle["per_layer"]["kl"]) == 29
    assert oracle["bytes"] == 200 * 2 * 64 * 4


def test_recall_cli_prints_every_method_as_json(heldout_text, capsys):
    argv = ["recall", "--text-file", str(heldout_text), "--context", "1024", "--budget", "256"]
    code = main([*argv, "--queries", "16", "--methods", "simhash,dashkv,quest", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert (report["context"], report["budget"], report["tier2"]) == (1024, 256, 16)
    methods = report["methods"]
    assert list(methods) == ["simhash", "dashkv", "quest"]
    for metrics in methods.values():
        assert 0 <= metrics["recall_at_100"] <= 1 and metrics["kl"] >= 0
    assert methods["simhash"]["exact_tokens"] == methods["dashkv"]["exact_tokens"] == 256
    assert 240 < methods["quest"]["exact_tokens"] <= 256  # whole pages of 16 within the budget
    assert methods["dashkv"]["approx_tokens"] == 16 and methods["quest"]["approx_tokens"] == 0
    # The shipped hasher, trained on other articles, finds more than SimHash with equal bits.
    assert methods["dashkv"]["recall_at_100"] > methods["simhash"]["recall_at_100"]


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dashkv: error:"), err
    for needle in needles:
        assert needle in lines[0]


def test_recall_cli_errors(heldout_text, tmp_path, capsys):
    text = ["--text-file", str(heldout_text), "--context", "1024"]
    _one_line_error(capsys, ["recall", *text, "--budget", "2"], "leaves nothing to select")
    _one_line_error(capsys, ["recall", *text, "--budget", "x/8"], "fraction")
    _one_line_error(capsys, ["recall", *text, "--methods", "full"], "reference")
    _one_line_error(capsys, ["recall", *text, "--methods", "magic"], "unknown method")
    _one_line_error(capsys, ["recall", "--text-file", str(tmp_path / "no.txt")], "no.txt")
    _one_line_error(capsys, ["recall", *text, "--hasher", str(tmp_path)], "no hasher at")
    _one_line_error(
        capsys, ["recall", "--text-file", str(heldout_text), "--context", "100000"], "exceeds"
    )

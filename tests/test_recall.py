"""Recall metrics on hand-computed cases, and `dashkv recall` on real held-out text."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.cli import main
from dashkv_jax.evaluation.recall import quest_bounds
from dashkv_jax.hashing.retrieval import Budget, selection_metrics


def test_metrics_on_a_hand_computed_case():
    # Eight keys, the first one ineligible (a sink). Group attention over the eligible seven:
    probs = jnp.array([0.0, 0.40, 0.05, 0.25, 0.10, 0.02, 0.15, 0.03])
    # Hashed scores rank keys 0 (ineligible, skipped), 2, 6, 1, 5, ... : candidates C=3 are
    # {2, 6, 1}.
    scores = jnp.array([9.0, 5.0, 7.0, 0.0, 1.0, 4.0, 6.0, 2.0])
    eligible = jnp.arange(8) >= 1
    got = selection_metrics(probs, scores, eligible, k=2, candidates=3)
    # O = top-2 by attention = {1, 3}. Candidates hold 1 of them: recall = 1/2.
    # S = top-2 of the candidates by attention = {1, 6}: |S & O| = 1, |S | O| = 3, IoU = 1/3.
    # Mass: S holds 0.40 + 0.15 = 0.55, O holds 0.40 + 0.25 = 0.65: 0.55 / 0.65.
    np.testing.assert_allclose(got, [0.5, 1 / 3, 0.55 / 0.65], rtol=1e-6)


def test_exact_scores_score_perfectly_and_reversed_scores_do_not():
    rng = np.random.default_rng(0)
    probs = jnp.asarray(rng.dirichlet(np.ones(100), size=(3, 5)), jnp.float32)  # [3, 5, 100]
    eligible = jnp.ones(100, bool)
    perfect = selection_metrics(probs, probs, eligible, k=4, candidates=8)
    assert perfect.shape == (3, 5, 3)
    np.testing.assert_allclose(perfect, 1.0, rtol=1e-6)
    worst = selection_metrics(probs, -probs, eligible, k=4, candidates=8)
    np.testing.assert_array_equal(worst[..., 0], 0.0)


def test_quest_bounds_by_hand():
    # One KV head, two query heads, D = 2; pages of 2 over 3 keys (the last page padded).
    keys = jnp.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]])[:, None, :]  # [T=3, Hkv=1, D=2]
    queries = jnp.array([[[1.0, 1.0], [-1.0, 0.0]]])  # [Q=1, Hq=2, D=2]
    got = quest_bounds(queries, keys, page=2)
    # Page 0 = keys 0, 1: max (3, 0), min (1, -2). Per dimension the larger of q*max, q*min:
    # head 0 (1, 1): 3 + 0 = 3; head 1 (-1, 0): -1 + 0 = -1. The group's best: 3 (keys 0, 1).
    # Page 1 = key 2 alone: head 0: -1 + 4 = 3; head 1: 1 + 0 = 1 -> 3.
    np.testing.assert_allclose(got, [[[3.0, 3.0, 3.0]]])
    queries = jnp.array([[[0.0, -1.0], [0.0, -1.0]]])
    # Page 0: -1 * min(-2, 0) = 2; page 1: -4.
    np.testing.assert_allclose(quest_bounds(queries, keys, page=2), [[[2.0, 2.0, -4.0]]])


def test_budget_sizes():
    assert Budget(1 / 32, 1 / 8).sizes(1024) == (32, 128)
    assert Budget(1 / 32, 1 / 8).sizes(8192) == (256, 1024)


@pytest.fixture(scope="module")
def heldout_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(data.load_documents(split="heldout")["text"][:3]))
    return path


def test_recall_cli_prints_every_method_as_json(heldout_text, capsys):
    argv = ["recall", "--text-file", str(heldout_text), "--context", "512", "--queries", "32"]
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert (report["context"], report["k"], report["candidates"]) == (512, 16, 64)
    methods = report["methods"]
    assert list(methods) == ["quest", "simhash", "asymmetric-hamming", "asymmetric-asymmetric"]
    for metrics in methods.values():
        assert set(metrics) == {"topk_recall", "iou", "mass_recall"}
        assert all(0 <= v <= 1 for v in metrics.values())
    # The shipped hasher, trained on other articles, finds more than SimHash with equal bits.
    for learned in ("asymmetric-hamming", "asymmetric-asymmetric"):
        assert methods[learned]["topk_recall"] > methods["simhash"]["topk_recall"] + 0.1
        assert methods[learned]["mass_recall"] > methods["quest"]["mass_recall"]


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dashkv: error:"), err
    for needle in needles:
        assert needle in lines[0]


def test_recall_cli_errors(heldout_text, tmp_path, capsys):
    text = ["--text-file", str(heldout_text)]
    _one_line_error(capsys, ["recall", *text, "--budget", "2"], "--budget")
    _one_line_error(capsys, ["recall", *text, "--candidates", "x/8"], "fraction")
    _one_line_error(capsys, ["recall", "--text-file", str(tmp_path / "no.txt")], "no.txt")
    _one_line_error(capsys, ["recall", *text, "--hasher", str(tmp_path)], "no hasher at")
    _one_line_error(
        capsys, ["recall", *text, "--context", "100000"], "tokens, fewer than the context"
    )

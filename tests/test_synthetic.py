"""RULER-style synthetic tasks: prompts of the asked length with facts at the asked depth."""

import pytest

from dashkv_jax.errors import DashKVError
from dashkv_jax.evaluation import synthetic


@pytest.fixture(scope="module")
def haystack(smollm2):
    return synthetic.Haystack(smollm2[1])


@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompts_have_the_length_and_hold_the_facts_at_their_depth(haystack, task, depth):
    sample = synthetic.make(task, haystack, 2048, depth, seed=3)
    assert sample.task == task and sample.depth == depth
    # Pieces are tokenized apart and joined: the whole is within a few tokens of the request.
    assert abs(sample.length - 2048) <= 8, sample.length
    assert sample.length == haystack.tokens(sample.prompt)
    for answer in sample.answers:
        assert answer in sample.prompt
    # The first fact sits at its depth of the haystack (to the next sentence end).
    first = sample.prompt.index(sample.answers[0])
    body_start = sample.prompt.index("\n\n") + 2
    body_end = sample.prompt.rindex("\n\n")
    where = (first - body_start) / (body_end - body_start)
    assert abs(where - depth) < 0.05, where


def test_multikey_asks_for_one_of_several_numbers(haystack):
    sample = synthetic.make("multikey", haystack, 1024, 0.3, seed=0)
    assert sample.prompt.count("One of the special magic numbers for") == 4
    asked = sample.prompt.rsplit("special magic number for ", 1)[1].split("?")[0]
    assert f"for {asked} is: {sample.answers[0]}." in sample.prompt


def test_variable_tracking_chains_every_name_to_the_value(haystack):
    sample = synthetic.make("variable_tracking", haystack, 1024, 0.2, seed=0)
    first, *rest = sample.answers
    value = sample.prompt.split(f"VAR {first} = ", 1)[1].split(".")[0]
    assert value.isdigit()
    for previous, name in zip(sample.answers, rest, strict=False):
        assert f"VAR {name} = VAR {previous}." in sample.prompt
    # Deeper links come later in the text.
    offsets = [sample.prompt.index(f"VAR {name} =") for name in sample.answers]
    assert offsets == sorted(offsets)


def test_score_counts_whole_answers():
    sample = synthetic.Sample("variable_tracking", "", ("ABCDE", "FGHIJ"), 10, 0.5)
    assert synthetic.score(sample, "ABCDE, FGHIJ") == 1.0
    assert synthetic.score(sample, "They are ABCDE and XFGHIJ") == 0.5  # a substring is no match
    assert synthetic.score(sample, "") == 0.0
    key = synthetic.Sample("passkey", "", ("27611",), 10, 0.5)
    assert synthetic.score(key, "The pass key is 27611.") == 1.0
    assert synthetic.score(key, "276110") == 0.0


def test_bad_requests_are_refused(haystack):
    with pytest.raises(DashKVError, match="unknown task"):
        synthetic.make("needle", haystack, 1024, 0.5)
    with pytest.raises(DashKVError, match="depth"):
        synthetic.make("passkey", haystack, 1024, 1.5)
    with pytest.raises(DashKVError, match="no room"):
        synthetic.make("passkey", haystack, 40, 0.5)
    with pytest.raises(DashKVError, match="fewer than"):
        synthetic.make("passkey", haystack, 10**6, 0.5)

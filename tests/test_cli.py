"""The `dashkv` command: its output, and one clear line + exit 2 for every kind of bad input."""

import json
import os
import subprocess
import sys

import pytest

from dashkv_jax.cli import main
from pallas_kernels import huge_pages


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_the_bundled_shape(capsys):
    code, out, _ = _run(["info"], capsys)
    assert code == 0
    assert "layers       30" in out and "kv heads     3" in out and "head_dim     64" in out
    assert "context      8192" in out and "134.5M" in out


def test_generate_streams_an_answer(capsys):
    argv = ["generate", "--chat", "--prompt", "What is the capital of France?"]
    code, out, _ = _run([*argv, "--max-new-tokens", "16"], capsys)
    assert code == 0 and "Paris" in out


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dashkv: error:"), err
    for needle in needles:
        assert needle in lines[0]


def test_missing_prompt_file(capsys, tmp_path):
    code, _, err = _run(["generate", "--prompt-file", str(tmp_path / "nope.txt")], capsys)
    _assert_one_line_error(code, err, "nope.txt")


def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(["info", "--model", str(tmp_path / "absent.gguf")], capsys)
    _assert_one_line_error(code, err, "absent.gguf")


def test_unknown_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    code, _, err = _run(["info", "--model", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM")


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    code, _, err = _run(["info", "--model", str(bad)], capsys)
    _assert_one_line_error(code, err, "broken.gguf")


def test_prompt_longer_than_context(capsys, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 9000)  # about 9000 tokens > 8192
    code, _, err = _run(["generate", "--prompt-file", str(prompt)], capsys)
    _assert_one_line_error(code, err, "exceeds the model's context of 8192")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate"], "--prompt"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "many"], "expected a whole number"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "top-p"),
        (["generate", "--prompt", "hi", "--greedy", "--temperature", "1"], "not allowed"),
        (["frobnicate"], "invalid choice"),
        (["generate", "--prompt", "hi", "--attention", "magic"], "invalid choice"),
        (["generate", "--prompt", "hi", "--attention", "oracle"], "needs a --budget"),
        (["generate", "--prompt", "hi", "--attention", "quest", "--budget", "9000"], "larger than"),
        (["generate", "--prompt", "hi", "--attention", "oracle", "--budget", "x"], "fraction"),
    ],
)
def test_bad_options(capsys, argv, needle):
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, needle)


def test_generate_with_a_budgeted_method(capsys):
    argv = ["generate", "--chat", "--prompt", "What is the capital of France?", "--attention"]
    code, out, _ = _run([*argv, "oracle", "--budget", "72", "--max-new-tokens", "40"], capsys)
    assert code == 0 and "Paris" in out


def test_console_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dashkv_jax.cli", "generate", "--prompt-file", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "dashkv: error:" in result.stderr


def test_entry_points_restart_with_huge_pages():
    """Where the kernel gives huge pages on request and glibc can ask, an entry point restarts
    once (same process id, same arguments) with malloc asking; a tunable already set, to 0 as
    the opt-out, is left alone and nothing restarts."""
    script = (
        "import os, sys; from pallas_kernels import huge_pages; print('start', os.getpid()); "
        "huge_pages.restart_with_huge_pages(); "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    expected = huge_pages._thp_mode() == "madvise" and huge_pages._glibc_asks()
    for tunables, restarts in ((None, expected), ("glibc.malloc.hugetlb=0", False)):
        environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        environ |= {"GLIBC_TUNABLES": tunables} if tunables else {}
        result = subprocess.run(
            [sys.executable, "-c", script, "a b", "--c"],
            env=environ,
            capture_output=True,
            text=True,
        )
        lines = result.stdout.splitlines()
        pid = lines[0].split()[1]
        assert lines.count(f"start {pid}") == (2 if restarts else 1), result.stdout
        after = "glibc.malloc.hugetlb=1" if restarts else tunables
        assert lines[-1] == f"{pid} {after} ['a b', '--c']"


@pytest.mark.parametrize("command", ["generate --prompt-file", "recall --text-file"])
def test_a_file_that_is_not_utf8_gets_one_line(capsys, tmp_path, command):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine so far \xff\xfe bad")
    code, _, err = _run([*command.split(), str(bad)], capsys)
    _assert_one_line_error(code, err, f"{bad} is not UTF-8 text (byte 12)")


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    from dashkv_jax import data

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(data.load_documents(split="heldout")["text"][:3]))
    return path


def test_perplexity_reports_what_each_method_read(heldout_file, capsys):
    argv = ["perplexity", "--text-file", str(heldout_file), "--context", "512", "--budget", "128"]
    methods = ["--methods", "full,streaming,dashkv", "--equal-bytes", "--json"]
    code, out, err = _run([*argv, *methods], capsys)
    assert code == 0, err
    report = json.loads(out)
    methods = report["methods"]
    assert list(methods) == ["full", "streaming", "dashkv"]
    assert report["tier2"] == 512 // 64  # the shipped hasher's 1/64
    # The budget asked for, DASH-KV's; StreamingLLM's matches its bytes with more tokens.
    assert report["budget"] == methods["dashkv"]["budget"] == 128
    assert methods["streaming"]["budget"] > 128
    for m in methods.values():
        assert {"perplexity", "exact_tokens", "approx_tokens", "bytes"} <= set(m)
    full, dashkv = methods["full"], methods["dashkv"]
    assert full["approx_tokens"] == 0 and dashkv["approx_tokens"] > 0
    assert dashkv["bytes"] < full["bytes"] and dashkv["exact_tokens"] < full["exact_tokens"]
    assert full["perplexity"] < dashkv["perplexity"] < 1.1 * full["perplexity"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--context", "100000"], "exceeds the model's context"),
        ([], "fewer than the context"),
        (["--methods", "full,magic"], "unknown method"),
        (["--budget", "60"], "leaves nothing to select"),
        (["--budget", "x"], "fraction"),
        (["--tier2", "-1"], "budget must be positive"),
        (["--prompt-tokens", "511"], "leaves nothing to decode"),
    ],
)
def test_perplexity_bad_input(heldout_file, tmp_path, capsys, extra, needle):
    text = heldout_file
    if needle == "fewer than the context":
        text = tmp_path / "short.txt"
        text.write_text("Too short to score. " * 100)
    argv = ["perplexity", "--text-file", str(text), "--context", "512", *extra]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, needle)

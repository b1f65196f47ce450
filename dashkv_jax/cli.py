"""The `dashkv` command: `info`, `generate`, `recall` and `add-checksums`."""

import argparse
import json
import sys
from pathlib import Path

from dashkv_jax.attention.methods import DEFAULT_CANDIDATES, METHODS
from dashkv_jax.data import read_text
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.loaders import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as one line and exit code 2, like every other error."""

    def error(self, message):
        raise DashKVError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """A fraction of the context: "1/32", "0.03125"."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction like 1/32, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _add_model_arg(parser):
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{DEFAULT_MODEL!r} (bundled, the default), a .gguf file or a Hugging Face folder",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dashkv",
        description="DASH-KV in JAX: long-context decoding with learned asymmetric KV hashing.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="print a model's shape: layers, heads, context, size")
    _add_model_arg(info)

    gen = commands.add_parser(
        "generate",
        help="generate text from a prompt, streaming tokens as they come",
        description="Prefill the prompt, then decode token by token (greedy by default).",
    )
    _add_model_arg(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: 128")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature (> 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass with --temperature")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--attention",
        default="full",
        choices=METHODS,
        help="decode attention method (default: full); all but full keep --budget tokens",
    )
    gen.add_argument(
        "--budget",
        help="tokens attended per KV head and step: a fraction of the context (1/32) or a count",
    )
    gen.add_argument(
        "--hasher",
        type=Path,
        help="hasher artifact for hashed methods (dashkv default: the shipped one)",
    )
    gen.add_argument(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        help=f"coarse-filter output for hashed methods (default: {DEFAULT_CANDIDATES})",
    )
    _add_recall_parser(commands)
    seal = commands.add_parser(
        "add-checksums",
        help="record the checksums of a hasher saved before they were recorded",
        description=(
            "Restore the hasher's weights, check that they are finite, and record the SHA-256 of "
            "every file under DIR/params in DIR/hasher.json, which loading then verifies. Where "
            "checksums are recorded already, check them instead."
        ),
    )
    seal.add_argument("hasher", type=Path, metavar="DIR", help="the hasher artifact folder")
    return parser


def _add_recall_parser(commands) -> None:
    rec = commands.add_parser(
        "recall",
        help="how well hashed scores find the keys exact attention needs, per method",
        description=(
            "Run the model over the first --context tokens of a text file, capture post-RoPE q "
            "and k, and for sampled query positions compare each method's top --candidates "
            "keys with the oracle top --budget keys (sinks and the recent window excluded). "
            "Prints top-k recall, IoU and attention-mass recall averaged over layers, heads "
            "and positions."
        ),
    )
    _add_model_arg(rec)
    rec.add_argument("--hasher", type=Path, help="trained hasher folder (default: the shipped one)")
    rec.add_argument("--symmetric", type=Path, help="a symmetric hasher to compare as well")
    rec.add_argument("--text-file", type=Path, required=True, help="the text to run")
    rec.add_argument("--context", type=_positive_int, default=1024, help="tokens (default 1024)")
    rec.add_argument("--budget", type=_fraction, default=1 / 32, help="k / context (1/32)")
    rec.add_argument("--candidates", type=_fraction, default=1 / 8, help="C / context (1/8)")
    rec.add_argument("--queries", type=_positive_int, default=128, help="query positions (128)")
    rec.add_argument(
        "--min-position", type=_fraction, default=0.5, help="queries from this fraction on (1/2)"
    )
    rec.add_argument("--sinks", type=int, default=4, help="always-kept first tokens (4)")
    rec.add_argument("--window", type=int, default=64, help="always-kept recent tokens (64)")
    rec.add_argument("--seed", type=int, default=0, help="positions and SimHash seed (0)")
    rec.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _info(args) -> None:
    import jax

    from dashkv_jax.models.loaders import load_model

    model, _ = load_model(args.model)
    c = model.config
    params = sum(p.size for p in jax.tree.leaves(model))
    rows = [
        ("model", c.name),
        ("layers", c.num_layers),
        ("query heads", c.num_heads),
        ("kv heads", c.num_kv_heads),
        ("head_dim", c.head_dim),
        ("hidden", c.hidden_size),
        ("context", c.max_position),
        ("rope base", f"{c.rope_theta:g}"),
        ("vocab", c.vocab_size),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}")


def _generate(args) -> None:
    from dashkv_jax.generate import Sampling, generate
    from dashkv_jax.models.loaders import load_model

    prompt = args.prompt if args.prompt_file is None else read_text(args.prompt_file)
    if args.temperature is not None and args.temperature <= 0:
        raise DashKVError(
            f"--temperature must be > 0 (use --greedy for argmax), got {args.temperature}"
        )
    sampling = Sampling(temperature=args.temperature or 0.0, top_p=args.top_p)
    model, tokenizer = load_model(args.model)

    def on_text(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        chat=args.chat,
        attention=args.attention,
        budget=args.budget,
        hasher=args.hasher,
        candidates=args.candidates,
        seed=args.seed,
        on_text=on_text,
    )
    sys.stdout.write("\n")


def _recall(args) -> None:
    from dashkv_jax.evaluation import recall
    from dashkv_jax.hashing.artifact import default_hasher_path, read_metadata
    from dashkv_jax.models.loaders import load_model

    text = read_text(args.text_file)  # before the slow model load, like the hashers below
    hasher_path = args.hasher or default_hasher_path(args.model)
    for path in (hasher_path, args.symmetric):
        if path is not None:
            read_metadata(path)  # fail before the slow model load
    model, tokenizer = load_model(args.model)
    report = recall.recall_report(
        model,
        tokenizer,
        text,
        hasher=hasher_path,
        symmetric=args.symmetric,
        context=args.context,
        budget=recall.Budget(args.budget, args.candidates),
        queries=args.queries,
        min_position=args.min_position,
        sinks=args.sinks,
        window=args.window,
        seed=args.seed,
    )
    report["text_file"] = str(args.text_file)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(recall.format_report(report))


def _add_checksums(args) -> None:
    from dashkv_jax.hashing.artifact import add_checksums

    print(add_checksums(args.hasher))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {
            "info": _info,
            "generate": _generate,
            "recall": _recall,
            "add-checksums": _add_checksums,
        }
        commands[args.command](args)
    except (DashKVError, FileNotFoundError) as err:
        print(f"dashkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `dashkv` command: `info`, `generate`, `recall` and `perplexity`."""

import argparse
import json
import sys
from pathlib import Path

from dashkv_jax.attention.methods import METHODS
from dashkv_jax.data import read_text
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.loaders import DEFAULT_MODEL
from pallas_kernels.huge_pages import restart_with_huge_pages


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
        help="exact tokens per KV head and step (sinks + window + tier 1): a fraction of the "
        "context (1/32) or a count",
    )
    gen.add_argument(
        "--tier2",
        help="DASH-KV's approximate tokens per KV head and step: a fraction of the context or a "
        "count, 0 for off (default: the hasher's, 1/64)",
    )
    gen.add_argument(
        "--hasher",
        type=Path,
        help="hasher artifact for hashed methods (dashkv default: the shipped one)",
    )
    _add_recall_parser(commands)
    _add_perplexity_parser(commands)
    return parser


def _add_method_args(parser) -> None:
    """The options the commands that measure several methods share."""
    parser.add_argument(
        "--budget",
        default="1/32",
        help="exact tokens per KV head and step (sinks + window + tier 1): a fraction of the "
        "context or a count (default: 1/32)",
    )
    parser.add_argument(
        "--tier2",
        help="DASH-KV's approximate tokens per KV head and step: a fraction of the context or a "
        "count, 0 for off (default: the hasher's, 1/64)",
    )
    parser.add_argument("--hasher", type=Path, help="the dashkv hasher (default: the shipped one)")
    parser.add_argument(
        "--symmetric", type=Path, help="the dashkv-symmetric hasher (default: the shipped one)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _method_list(text: str) -> tuple[str, ...]:
    names = tuple(filter(None, (name.strip() for name in text.split(","))))
    if unknown := [n for n in names if n not in METHODS]:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})"
        )
    if not names:
        raise argparse.ArgumentTypeError("no methods given")
    return names


def _add_recall_parser(commands) -> None:
    rec = commands.add_parser(
        "recall",
        help="the paper's retrieval metrics, Recall@100 and KL, of each method on a text",
        description=(
            "Run the model over the first --context tokens of a text file and, for sampled query "
            "positions and every sparse layer, compare each method's decode-time attention with "
            "full attention: Recall@100 (of the 100 middle keys with the highest exact group "
            "attention, the share the method reads exactly), KL(P_method || P_full), the tokens "
            "it used and the bytes a step reads per KV head. Means over sparse layers, heads and "
            "positions; --json adds every layer."
        ),
    )
    _add_model_arg(rec)
    rec.add_argument("--text-file", type=Path, required=True, help="the text to run")
    rec.add_argument(
        "--methods",
        type=_method_list,
        default=("simhash", "dashkv"),
        help="comma-separated budget methods (default: simhash,dashkv)",
    )
    rec.add_argument("--context", type=_positive_int, default=4096, help="tokens (default 4096)")
    _add_method_args(rec)
    rec.add_argument("--queries", type=_positive_int, default=64, help="query positions (64)")
    rec.add_argument(
        "--min-position", type=_fraction, default=0.5, help="queries from this fraction on (1/2)"
    )
    rec.add_argument("--seed", type=int, default=0, help="positions and SimHash seed (0)")


def _add_perplexity_parser(commands) -> None:
    ppl = commands.add_parser(
        "perplexity",
        help="decode-mode perplexity of a text through each method, with what each read",
        description=(
            "Teacher-forced decode-mode perplexity of the first --context tokens of a text file: "
            "every position attends through the method as token-by-token decoding would. Each "
            "method reports its perplexity, exact and approximate tokens per KV head and step, "
            "and the bytes a step reads per KV head (codes, K and V of exact tokens, V of "
            "approximate ones), means over positions and layers."
        ),
    )
    _add_model_arg(ppl)
    ppl.add_argument("--text-file", type=Path, required=True, help="the text to run")
    ppl.add_argument("--context", type=_positive_int, default=4096, help="tokens (default 4096)")
    ppl.add_argument(
        "--methods",
        type=_method_list,
        default=("full", "simhash", "dashkv"),
        help="comma-separated methods (default: full,simhash,dashkv)",
    )
    _add_method_args(ppl)
    ppl.add_argument(
        "--equal-bytes",
        action="store_true",
        help="give every budget method that is not hashed the token budget whose bytes per step "
        "match DASH-KV's at --budget and --tier2 (equal work, not equal tokens)",
    )
    ppl.add_argument(
        "--prompt-tokens",
        type=_positive_int,
        default=0,
        help="score only the tokens after a prompt of this many, prefilled as each method "
        "prefills one (SnapKV compresses it, H2O and HashEvict evict to their budget) and then "
        "decoded step by step (default: every position, teacher-forced)",
    )


def _info(args) -> None:
    import jax

    from dashkv_jax.models.loaders import load_model

    model, _ = load_model(args.model)
    c = getattr(model, "arch", model.config)  # Gemma 3: every layer, not the global ones
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
        tier2=args.tier2,
        seed=args.seed,
        on_text=on_text,
    )
    sys.stdout.write("\n")


def _recall(args) -> None:
    from dashkv_jax.evaluation import recall
    from dashkv_jax.models.loaders import load_model

    text = read_text(args.text_file)  # before the slow model load
    _check_hashers(args)
    model, tokenizer = load_model(args.model)
    report = recall.recall_report(
        model,
        tokenizer,
        text,
        methods=args.methods,
        hasher=args.hasher,
        symmetric=args.symmetric,
        context=args.context,
        budget=args.budget,
        tier2=args.tier2,
        queries=args.queries,
        min_position=args.min_position,
        seed=args.seed,
    )
    report["text_file"] = str(args.text_file)
    print(json.dumps(report, indent=2) if args.json else recall.format_report(report))


def _perplexity(args) -> None:
    from dashkv_jax.evaluation import perplexity
    from dashkv_jax.models.loaders import load_model

    text = read_text(args.text_file)
    if args.prompt_tokens > args.context - 2:
        raise DashKVError(
            f"--prompt-tokens {args.prompt_tokens} leaves nothing to decode in --context "
            f"{args.context} (at most {args.context - 2})"
        )
    _check_hashers(args)
    model, tokenizer = load_model(args.model)
    report = perplexity.perplexity_report(
        model,
        tokenizer,
        text,
        methods=args.methods,
        context=args.context,
        budget=args.budget,
        tier2=args.tier2,
        hasher=args.hasher,
        symmetric=args.symmetric,
        equal_bytes=args.equal_bytes,
        prompt=args.prompt_tokens,
    )
    report["text_file"] = str(args.text_file)
    print(json.dumps(report, indent=2) if args.json else perplexity.format_report(report))


def _check_hashers(args) -> None:
    """Check the budgets and read the hashers' metadata before the slow model load, so that bad
    input fails at once."""
    from dashkv_jax.attention.methods import parse_budget
    from dashkv_jax.hashing.artifact import read_metadata

    parse_budget(args.budget, args.context)
    if args.tier2 is not None:
        parse_budget(args.tier2, args.context, allow_zero=True)
    for path in (args.hasher, args.symmetric):
        if path is not None:
            read_metadata(path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {
            "info": _info,
            "generate": _generate,
            "recall": _recall,
            "perplexity": _perplexity,
        }
        commands[args.command](args)
    except (DashKVError, FileNotFoundError) as err:
        print(f"dashkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> int:
    """The `dashkv` command: `main` in a process whose large buffers sit on huge pages."""
    restart_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(run())

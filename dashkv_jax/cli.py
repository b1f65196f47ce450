"""The `dashkv` command: `dashkv info` and `dashkv generate`."""

import argparse
import sys
from pathlib import Path

from dashkv_jax.errors import DashKVError
from dashkv_jax.loaders import DEFAULT_MODEL
from dashkv_jax.methods import METHODS


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
    return parser


def _info(args) -> None:
    import jax

    from dashkv_jax.loaders import load_model

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
    from dashkv_jax.loaders import load_model

    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise DashKVError(f"no prompt file at {str(args.prompt_file)!r}")
        prompt = args.prompt_file.read_text()
    else:
        prompt = args.prompt
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
        seed=args.seed,
        on_text=on_text,
    )
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        {"info": _info, "generate": _generate}[args.command](args)
    except (DashKVError, FileNotFoundError) as err:
        print(f"dashkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

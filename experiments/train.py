"""Train a DASH-KV hasher: capture q/k from the frozen model, train, export, report recall.

    python experiments/train.py                                # smollm2_cpu, the default
    python experiments/train.py --config smollm2_2k            # the shipped hasher
    python experiments/train.py --steps 200 --out runs/quick   # overrides
    python experiments/train.py --bits 64 --kind symmetric --out runs/sym64
    python experiments/train.py --config llama3_8b_pod --model /data/Meta-Llama-3-8B
    python experiments/train.py --set train.learning_rate=1e-3 --set train.query_hidden=256,256

Resumes from the latest checkpoint in --out automatically (--resume-step S: from step S,
dropping later ones; --fresh: start over). Logs go to stdout and OUT/log.jsonl; the hasher is
exported to OUT/hasher and the held-out recall table (beside SimHash) to OUT/results.json.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs  # noqa: E402

from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.hashing import training  # noqa: E402

# Shortcut flags -> dotted config fields.
SHORTCUTS = {
    "steps": "train.steps",
    "bits": "train.bits",
    "kind": "train.kind",
    "seed": "train.seed",
    "batch_size": "train.batch_size",
    "out": "out",
    "model": "model",
}


def _convert(text: str, current):
    kind = type(current)
    if current is None or kind is str:
        return None if text.lower() == "none" and current is None else text
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    if kind is tuple:  # widths: "64,64"; "" for none
        return tuple(int(part) for part in text.split(",") if part.strip())
    return kind(text)


def override(config, dotted: str, text: str):
    """A copy of the frozen config with field `a.b.c` set from text (typed like the field)."""
    head, _, rest = dotted.partition(".")
    names = {f.name for f in dataclasses.fields(config)}
    if head not in names:
        raise DashKVError(f"no config field {head!r} in {type(config).__name__}: {sorted(names)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise DashKVError(f"{head!r} has no fields")
        return dataclasses.replace(config, **{head: override(current, rest, text)})
    try:
        value = _convert(text, current)
    except ValueError:
        raise DashKVError(f"bad value {text!r} for {dotted}") from None
    return dataclasses.replace(config, **{head: value})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=configs.DEFAULT, choices=configs.NAMES)
    for flag in SHORTCUTS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--resume-step", type=int, help="resume from this checkpoint step")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def build_config(args) -> training.RunConfig:
    config = configs.load(args.config)
    pairs: list[tuple[str, str]] = [
        (field, getattr(args, flag))
        for flag, field in SHORTCUTS.items()
        if getattr(args, flag) is not None
    ]
    for item in args.set:
        field, eq, value = item.partition("=")
        if not eq:
            raise DashKVError(f"--set wants FIELD=VALUE, got {item!r}")
        pairs.append((field, value))
    for field, value in pairs:
        config = override(config, field, value)
    config.validate()
    return config


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        config = build_config(args)
        if args.fresh:
            training.reset_run_dir(config.out)
        training.run(config, resume_step=args.resume_step, quiet=args.quiet)
    except DashKVError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

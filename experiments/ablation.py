"""DASH-KV's ablation: each component added in turn, the loss, the encoders' symmetry and the
sandwich, each with Recall@100, KL, decode-mode perplexity and bytes per step.

    python experiments/ablation.py --bt-hasher runs/smollm2_2k_bt/hasher      # held-out, 4096
    python experiments/ablation.py --rows full,hashing-only --context 2048 --out runs/abl

Rows (all at the same exact budget and bits; tier 2 at the hasher's default where it is on):

    simhash         random projections (the paper's naive LSH), every component on
    hashing-only    the learned hasher, tier 1 alone: no calibration, no tier 2
    +consensus      ... and the cross-head vote
    +momentum       ... and the previous layer's attention
    +tier2          ... and tier 2, its logit without the residual MLP
    full            the whole method (the residual MLP too)
    symmetric       the symmetric learned hasher (one encoder for both sides), every component on
    bt              a hasher trained with Bradley-Terry pairs instead of KL (--bt-hasher), full
    no-sandwich     the whole method in every layer (no exact layers)
    oracle          exact top-k at the same exact budget (the ceiling of tier 1 alone)

Recall@100 and KL through each row's decode path on one window of the text
(`evaluation.recall`), perplexity teacher-forced over the same window (`evaluation.perplexity`).
Held-out text by default: the settings were chosen on the validation split. Prints a table,
writes OUT/ablation.json and OUT/ablation.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashkv_jax import data  # noqa: E402
from dashkv_jax.attention.methods import make_methods  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation.perplexity import decode_perplexity  # noqa: E402
from dashkv_jax.evaluation.recall import method_metrics  # noqa: E402
from dashkv_jax.hashing.capture import CaptureConfig, sample_positions  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

OFF = {"consensus": False, "momentum": False}
ROWS = {  # name: (method, options, which hasher)
    "simhash": ("simhash", {}, None),
    "hashing-only": ("dashkv", {**OFF, "tier2": 0}, None),
    "+consensus": ("dashkv", {"momentum": False, "tier2": 0}, None),
    "+momentum": ("dashkv", {"tier2": 0}, None),
    "+tier2": ("dashkv", {"residual": False}, None),
    "full": ("dashkv", {}, None),
    "symmetric": ("dashkv-symmetric", {}, None),
    "bt": ("dashkv", {}, "bt"),
    "no-sandwich": ("dashkv", {"dense_first": 0, "dense_last": 0}, None),
    "oracle": ("oracle", {}, None),
}


def build(model, name: str, args):
    method, options, which = ROWS[name]
    options = dict(options)
    tier2 = options.pop("tier2", args.tier2)
    hasher = args.bt_hasher if which == "bt" else args.hasher
    (attention,) = make_methods(
        model, [method], args.context, args.budget, tier2, hasher, args.symmetric, options
    ).values()
    return attention


def run(args) -> dict:
    model, tokenizer = load_model(args.model)
    ids = data.first_window(
        args.split, tokenizer, args.context, max_context=model.config.max_position
    )
    sample = CaptureConfig(split="text", context=args.context, contexts=1,
                           queries_per_context=args.queries, seed=0)  # fmt: skip
    positions = sample_positions(sample, 0)
    attentions = {name: build(model, name, args) for name in args.rows}  # bad input fails first
    full = decode_perplexity(model, ids)["perplexity"]
    rows = {}
    for name, attention in tqdm(attentions.items(), desc="rows", unit="row"):
        start = time.perf_counter()
        metrics = method_metrics(model, ids, {name: attention}, positions)[name]
        result = decode_perplexity(model, ids, attention)
        rows[name] = {
            "recall_at_100": metrics["recall_at_100"],
            "kl": metrics["kl"],
            "perplexity": result["perplexity"],
            "increase": result["perplexity"] / full - 1,
            "exact_tokens": result["exact_tokens"],
            "approx_tokens": result["approx_tokens"],
            "bytes": result["bytes"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    return {
        "model": model.config.name,
        "split": args.split,
        "context": args.context,
        "budget": args.budget,
        "tier2": args.tier2,
        "queries": len(positions),
        "full_perplexity": full,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['context']} {result['split']} tokens, exact budget {result['budget']}, full "
        f"attention {result['full_perplexity']:.3f}; Recall@100 and KL: means over sparse "
        f"layers at {result['queries']} positions; tokens and bytes: per KV head and step, "
        "means over positions and all layers",
        "",
        "| row | Recall@100 | KL | perplexity | exact | approx | KiB/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['recall_at_100']:.3f} | {r['kl']:.3f} | {r['perplexity']:.3f} "
            f"({100 * r['increase']:+.2f}%) | {r['exact_tokens']:.0f} | {r['approx_tokens']:.0f} "
            f"| {r['bytes'] / 1024:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hasher", type=Path, help="the dashkv hasher (default: shipped)")
    parser.add_argument("--symmetric", type=Path, help="the symmetric hasher (default: shipped)")
    parser.add_argument("--bt-hasher", type=Path, help="a hasher trained with loss=bt")
    parser.add_argument("--split", default="heldout", choices=("validation", "heldout"))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", default="1/32")
    parser.add_argument("--tier2", default=None, help="tier 2 where on (default: the hasher's)")
    parser.add_argument("--queries", type=int, default=64, help="positions for recall and KL")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    try:
        if unknown := [r for r in args.rows if r not in ROWS]:
            raise DashKVError(f"unknown row(s) {', '.join(unknown)} (known: {', '.join(ROWS)})")
        if "bt" in args.rows and args.bt_hasher is None:
            raise DashKVError("the bt row needs --bt-hasher (train one with --set train.loss=bt)")
        result = run(args)
    except DashKVError as error:
        print(f"ablation: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ablation.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    seconds = sum(r["seconds"] for r in result["rows"].values())
    print(f"wrote {args.out / 'ablation.json'} and ablation.md ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())

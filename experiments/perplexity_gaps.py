"""Where a method's perplexity goes: its excess NLL over full attention, position by position.

    python experiments/perplexity_gaps.py                              # held-out, 8192 tokens
    python experiments/perplexity_gaps.py --split validation --hasher runs/x/hasher

Every position of one window attends through each method (teacher-forced, as `dashkv
perplexity`); the excess of a position is the method's NLL of the next token minus full
attention's. Reported per method:

- the mean excess in position buckets (does it grow with the distance from the training length?);
- the share of the total excess carried by the `--top` worst positions (a few catastrophes, or a
  little everywhere?);
- how many of those worst positions are copies, where the next token repeats a bigram seen
  earlier in the window (what induction heads retrieve: `ids[p], ids[p+1]` occurred before),
  against the share of copies among all positions;
- the worst positions with their text and the token full attention predicted;
- Recall@100 and KL per sparse layer at the focus method's worst positions
  (`evaluation.recall.method_metrics`), for every method: which layers lose what full attention
  found there.

Prints a table, writes OUT/gaps.json and OUT/gaps.png (mean excess by position).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashkv_jax import data  # noqa: E402
from dashkv_jax.attention.methods import make_methods  # noqa: E402
from dashkv_jax.attention.sparse import SparseAttention  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation.perplexity import token_nll  # noqa: E402
from dashkv_jax.evaluation.recall import method_metrics  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

BUCKETS = 8


def copies(ids: np.ndarray) -> np.ndarray:
    """[T - 1] bool: entry p is True when the bigram (ids[p], ids[p + 1]) occurred before p."""
    seen, out = set(), np.zeros(len(ids) - 1, bool)
    for p in range(len(ids) - 1):
        pair = (int(ids[p]), int(ids[p + 1]))
        out[p] = pair in seen
        seen.add(pair)
    return out


def run(args) -> dict:
    model, tokenizer = load_model(args.model)
    ids = data.first_window(
        args.split, tokenizer, args.context, max_context=model.config.max_position
    )
    attentions = make_methods(
        model, args.methods, args.context, args.budget, args.tier2, args.hasher, None, None
    )  # bad input fails before the long runs
    if stepwise := [n for n, a in attentions.items() if not isinstance(a, SparseAttention)]:
        raise DashKVError(
            f"{', '.join(stepwise)}: not a selection method (the layers at the worst positions "
            "are read through a selection's decode path); give simhash, dashkv, oracle, ..."
        )
    full = token_nll(model, ids)
    excess = {}
    for name, attention in tqdm(attentions.items(), desc="methods", unit="method"):
        excess[name] = token_nll(model, ids, attention) - full
    is_copy = copies(ids)
    edges = np.linspace(0, len(full), BUCKETS + 1).astype(int)
    methods = {}
    for name, e in excess.items():
        worst = np.argsort(e)[::-1][: args.top]
        methods[name] = {
            "perplexity": float(np.exp((full + e).mean())),
            "mean_excess": float(e.mean()),
            "bucket_excess": [
                float(e[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)
            ],
            "top_share": float(e[worst].sum() / e.sum()) if e.sum() > 0 else None,
            "top_copies": float(is_copy[worst].mean()),
            "worst": [
                {
                    "position": int(p),
                    "excess": round(float(e[p]), 3),
                    "full_nll": round(float(full[p]), 3),
                    "text": tokenizer.decode(ids[max(0, p - 20) : p + 1].tolist())[-100:],
                    "next": tokenizer.decode([int(ids[p + 1])]),
                    "copy": bool(is_copy[p]),
                }
                for p in worst[: args.show]
            ],
        }
    focus = np.sort(np.argsort(excess[args.focus])[::-1][: args.top])
    layers = method_metrics(model, ids, attentions, focus)
    for name, metrics in layers.items():
        methods[name]["at_worst"] = {
            "sparse_layers": metrics["sparse_layers"],
            "recall_at_100": metrics["per_layer"]["recall_at_100"],
            "kl": metrics["per_layer"]["kl"],
        }
    return {
        "model": model.config.name,
        "split": args.split,
        "context": args.context,
        "budget": args.budget,
        "tier2": args.tier2,
        "hasher": str(args.hasher) if args.hasher else None,
        "full_perplexity": float(np.exp(full.mean())),
        "copy_share": float(is_copy.mean()),
        "bucket_edges": edges.tolist(),
        "top": args.top,
        "focus": args.focus,
        "methods": methods,
    }


def report(result: dict) -> str:
    edges = result["bucket_edges"]
    lines = [
        f"{result['context']} {result['split']} tokens, exact budget {result['budget']}, full "
        f"attention {result['full_perplexity']:.3f}; copies: {100 * result['copy_share']:.1f}% "
        "of all positions",
        "",
        "mean excess NLL (nats) by position",
        f"{'method':<18}"
        + "".join(f"{f'{a}-{b}':>12}" for a, b in zip(edges[:-1], edges[1:], strict=True)),
    ]
    for name, m in result["methods"].items():
        lines.append(f"{name:<18}" + "".join(f"{x:>+12.4f}" for x in m["bucket_excess"]))
    lines += ["", f"{'method':<18} {'perplexity':>10} {'top share':>10} {'top copies':>11}"]
    for name, m in result["methods"].items():
        share = "n/a" if m["top_share"] is None else f"{100 * m['top_share']:.1f}%"
        lines.append(
            f"{name:<18} {m['perplexity']:>10.3f} {share:>10} {100 * m['top_copies']:>10.1f}%"
        )
    lines += ["", f"at the {result['top']} worst positions of {result['focus']}, per sparse layer"]
    for name, m in result["methods"].items():
        w = m["at_worst"]
        lines.append(f"{name:<18} KL " + " ".join(f"{x:.2f}" for x in w["kl"]))
    focus = result["methods"][result["focus"]]
    lines += ["", f"worst positions of {result['focus']}"]
    for w in focus["worst"]:
        lines.append(
            f"{w['position']:>6} +{w['excess']:.2f} nats (full {w['full_nll']:.2f})"
            f"{' copy' if w['copy'] else '     '}  {w['text']!r} -> {w['next']!r}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(result["bucket_edges"])
    middle = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, m in result["methods"].items():
        ax.plot(middle, m["bucket_excess"], marker="o", label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("excess NLL over full attention (nats)")
    ax.set_title(f"{result['split']} text, exact budget {result['budget']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hasher", type=Path, help="the dashkv hasher (default: shipped)")
    parser.add_argument("--split", default="heldout", choices=("validation", "heldout"))
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--budget", default="1/32")
    parser.add_argument("--tier2", default=None, help="tier 2 (default: the hasher's)")
    parser.add_argument("--methods", default="simhash,dashkv", help="comma-separated")
    parser.add_argument("--focus", help="whose worst positions the layers are read at (last)")
    parser.add_argument("--top", type=int, default=50, help="worst positions counted (50)")
    parser.add_argument("--show", type=int, default=12, help="worst positions printed (12)")
    parser.add_argument("--out", type=Path, default=Path("runs/perplexity_gaps"))
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.focus = args.focus or args.methods[-1]
    start = time.perf_counter()
    try:
        if args.focus not in args.methods:
            raise DashKVError(f"--focus {args.focus} is not one of --methods")
        result = run(args)
    except DashKVError as err:
        print(f"perplexity_gaps: error: {err}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gaps.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "gaps.png")
    print(report(result))
    print(f"\nwrote {args.out}/gaps.json and gaps.png")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())

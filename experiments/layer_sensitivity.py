"""Per-layer sensitivity to DASH-KV: replace one layer at a time, measure perplexity (the paper's
Table 3), and choose the sandwich from the U-curve.

    python experiments/layer_sensitivity.py                       # validation text, 4096 tokens
    python experiments/layer_sensitivity.py --hasher runs/x/hasher --out runs/sensitivity

For each layer l, decode-mode perplexity of validation text with DASH-KV in layer l alone
(every other layer exact), against full attention: the increase is layer l's sensitivity. The
sandwich is then the run of layers at each end whose sensitivity exceeds `--factor` times the
median (the first and last layers are the fragile ones): `dense_first` counts them from the
start, `dense_last` from the end. Settings are chosen on the validation split, never on the
held-out text results are reported on. Prints a table, writes OUT/sensitivity.json and a plot
OUT/sensitivity.png.
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
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation.perplexity import decode_perplexity  # noqa: E402
from dashkv_jax.hashing.artifact import set_decode_defaults  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402


def choose_sandwich(increase: np.ndarray, factor: float) -> tuple[int, int]:
    """(dense_first, dense_last): the layers at each end, counted until the first one whose
    increase is at most `factor` x the median increase."""
    bound = factor * float(np.median(increase))
    first = next((i for i, x in enumerate(increase) if x <= bound), len(increase))
    last = next((i for i, x in enumerate(increase[::-1]) if x <= bound), len(increase))
    return first, last


def run(args) -> dict:
    model, tokenizer = load_model(args.model)
    ids = data.first_window(
        args.split, tokenizer, args.context, max_context=model.config.max_position
    )
    layers = model.config.num_layers
    start = time.perf_counter()
    full = decode_perplexity(model, ids)["perplexity"]
    rows = []
    for layer in tqdm(range(layers), desc="layers", unit="layer"):
        only = {"dense_first": layer, "dense_last": layers - layer - 1}
        (attention,) = make_methods(
            model, ["dashkv"], args.context, args.budget, args.tier2, args.hasher, options=only
        ).values()
        result = decode_perplexity(model, ids, attention)
        rows.append(
            {
                "layer": layer,
                "perplexity": result["perplexity"],
                "increase": result["perplexity"] / full - 1,
            }
        )
    increase = np.array([r["increase"] for r in rows])
    dense_first, dense_last = choose_sandwich(increase, args.factor)
    return {
        "model": model.config.name,
        "split": args.split,
        "context": args.context,
        "budget": args.budget,
        "tier2": args.tier2,
        "hasher": str(args.hasher or "shipped"),
        "full_perplexity": full,
        "layers": rows,
        "factor": args.factor,
        "median_increase": float(np.median(increase)),
        "dense_first": dense_first,
        "dense_last": dense_last,
        "seconds": round(time.perf_counter() - start, 1),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in result["layers"]]
    increase = [100 * r["increase"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(layers, increase, color="tab:blue")
    bound = 100 * result["factor"] * result["median_increase"]
    ax.axhline(bound, color="black", linestyle="--", label=f"{result['factor']:g} x median")
    first, last = result["dense_first"], result["dense_last"]
    for layer in [*range(first), *range(len(layers) - last, len(layers))]:
        ax.bar(layer, increase[layer], color="tab:red")
    ax.set(xlabel="layer with DASH-KV (all others exact)", ylabel="perplexity increase (%)")
    ax.set_title(f"Per-layer sensitivity, {result['context']} {result['split']} tokens "
                 f"(red: kept exact)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hasher", type=Path, help="the dashkv hasher (default: the shipped one)")
    parser.add_argument("--split", default="validation", choices=("train", "validation"))
    parser.add_argument("--context", type=int, default=4096, help="tokens scored (4096)")
    parser.add_argument("--budget", default="1/32", help="exact budget (1/32)")
    parser.add_argument("--tier2", default=None, help="tier 2 (default: the hasher's)")
    parser.add_argument("--factor", type=float, default=2.0, help="x median: fragile (2)")
    parser.add_argument("--out", type=Path, default=Path("runs/sensitivity"))
    parser.add_argument(
        "--write-to",
        type=Path,
        metavar="HASHER",
        help="record the chosen sandwich as this hasher artifact's decoding default",
    )
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except DashKVError as error:
        print(f"layer_sensitivity: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "sensitivity.png")
    print(f"full attention: {result['full_perplexity']:.3f} over {args.context} tokens")
    print(f"{'layer':>5} {'perplexity':>10} {'increase':>9}")
    for r in result["layers"]:
        print(f"{r['layer']:>5} {r['perplexity']:>10.3f} {100 * r['increase']:>8.2f}%")
    print(f"sandwich: dense_first={result['dense_first']} dense_last={result['dense_last']} "
          f"(layers above {args.factor:g} x the median increase)")  # fmt: skip
    if args.write_to is not None:
        set_decode_defaults(
            args.write_to, dense_first=result["dense_first"], dense_last=result["dense_last"]
        )
        print(f"recorded in {args.write_to}/hasher.json")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())

"""Passkey digits read back through each method, teacher-forced: every digit's NLL and argmax.

    python experiments/passkey_digits.py --model gemma3-270m --lengths 4096 \
        --hashers checkpoints/gemma3-270m,runs/gemma3_2k/hasher       # validation haystack
    python experiments/passkey_digits.py --lengths 4096,8000 --split heldout --out runs/digits

A greedy passkey answer is right or wrong, and a method that misreads one digit of five scores
as one that reads none. Here the prompt (`evaluation.synthetic`'s passkey at each length, depth
and key) is prefilled exactly, as `generate_each` does, and the right answer is then decoded
through each method token by token: every digit is scored by its NLL and by whether it is the
method's argmax. The answer's lead-in ("The pass key is", or the cue of a model without a chat
template) is decoded through the method too, as in generation, but not scored.

The measure for choosing a hasher's settings on validation text (the default haystack) before
the held-out greedy tables of `eval.py`. Prints a table; writes OUT/digits.json.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval as evaluation  # noqa: E402  (experiments/eval.py: its argparse list type)

from dashkv_jax import data  # noqa: E402
from dashkv_jax.attention.full import FullAttention  # noqa: E402
from dashkv_jax.attention.methods import METHODS, make_methods, parse_budget  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation import synthetic  # noqa: E402
from dashkv_jax.generate import _prompt_ids, prefill_exact  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

SLOT_MULTIPLE = 512  # caches of nearly equal prompts share one compiled step per method


# Not `llama.decode_step`: that one donates its cache, and every method adopts the one exact
# prefill's cache (full attention adopts it as it is).
@nnx.jit(graph_updates=False)
def _step(model, token, cache, attention):
    return model.decode_step(token, cache, attention)


def answer_ids(model, tokenizer, sample) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a passkey sample: the answer is the lead-in and the key."""
    chat = model.chat_template is not None
    prompt = _prompt_ids(
        model, tokenizer, sample.prompt if chat else sample.prompt + sample.cue, chat, 16
    )
    answer = ("The pass key is " if chat else " ") + sample.answers[0]
    return prompt, tokenizer.encode(answer, add_special_tokens=False).ids


def score_digits(model, tokenizer, prompt, answer, attentions: dict) -> dict:
    """{name: (NLL per digit [n], argmax right [n])} of the answer decoded through each method."""
    digits = [j for j, t in enumerate(answer) if tokenizer.decode([t]).strip().isdigit()]
    slots = -(-(len(prompt) + len(answer) + 1) // SLOT_MULTIPLE) * SLOT_MULTIPLE
    slots = min(slots, model.config.max_position)
    logits0, exact = prefill_exact(model, jnp.asarray([prompt], jnp.int32), slots)
    out = {}
    for name, attention in attentions.items():
        cache, logits, nll, right = model.adopt_cache(exact, attention), logits0, [], []
        for j, token in enumerate(answer):
            if j in digits:
                log_p = jax.nn.log_softmax(logits[0])
                nll.append(-float(log_p[token]))
                right.append(int(jnp.argmax(log_p)) == token)
            logits, cache = _step(model, jnp.array([token], jnp.int32), cache, attention)
        out[name] = (nll, right)
    return out


def run(args) -> dict:
    model, tokenizer = load_model(args.model)
    documents = data.load_documents(split=args.split)["text"]
    haystack = synthetic.Haystack(tokenizer, documents)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        raise DashKVError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    hashers = args.hashers.split(",") if args.hashers else [None]
    rows = []
    cases = [(n, d, k) for n in args.lengths for d in args.depths for k in range(args.keys)]
    attentions = {}  # per length: one budget
    for length, depth, key in tqdm(cases, desc="passkey digits", unit="prompt"):
        if length not in attentions:
            budget = str(parse_budget(args.budget, length))
            chosen = {"full": FullAttention()} if "full" in methods else {}
            for name in [m for m in methods if m != "full"]:
                for hasher in hashers if name == "dashkv" else hashers[:1]:
                    label = f"{name}:{hasher}" if name == "dashkv" and args.hashers else name
                    made = make_methods(model, [name], length, budget, args.tier2, hasher)
                    chosen[label] = made[name]
            attentions[length] = chosen
        sample = synthetic.make("passkey", haystack, length, depth, seed=key)
        prompt, answer = answer_ids(model, tokenizer, sample)
        for name, (nll, right) in score_digits(
            model, tokenizer, prompt, answer, attentions[length]
        ).items():
            rows.append(
                {"method": name, "length": length, "depth": depth, "key": sample.answers[0],
                 "nll": nll, "right": right}
            )  # fmt: skip
    return {
        "model": model.config.name,
        "split": args.split,
        "budget": args.budget,
        "tier2": args.tier2,
        "rows": rows,
        "summary": summary(rows),
    }


def summary(rows) -> list[dict]:
    """Per method and length: mean digit NLL and digits right, over depths and keys."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for length in sorted({r["length"] for r in rows}):
            mine = [r for r in rows if (r["method"], r["length"]) == (method, length)]
            nll = [x for r in mine for x in r["nll"]]
            right = [x for r in mine for x in r["right"]]
            out.append(
                {"method": method, "length": length, "digit_nll": float(np.mean(nll)),
                 "right": int(sum(right)), "digits": len(right)}
            )  # fmt: skip
    return out


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['split']} haystack, exact budget {result['budget']}: "
        "mean NLL of each passkey digit, and digits the method's argmax gets right",
        f"{'method':<48} {'length':>6} {'digit NLL':>9} {'right':>9}",
    ]
    for s in result["summary"]:
        right = f"{s['right']}/{s['digits']}"
        lines.append(f"{s['method']:<48} {s['length']:>6} {s['digit_nll']:>9.3f} {right:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--lengths", type=evaluation._numbers(int), default=(4096,), help="prompt tokens"
    )
    parser.add_argument("--depths", type=evaluation._numbers(float), default=(0.1, 0.5, 0.9))
    parser.add_argument("--keys", type=int, default=2, help="passkeys per length and depth")
    parser.add_argument("--budget", default="1/32", help="exact budget: a fraction or tokens")
    parser.add_argument("--tier2", help="approximate tokens (default: the hasher's)")
    parser.add_argument("--methods", default="full,simhash,dashkv", help="comma-separated")
    parser.add_argument(
        "--hashers", help="comma-separated hasher folders, each scored as dashkv (default: shipped)"
    )
    parser.add_argument(
        "--split",
        default="validation",
        choices=("validation", "heldout"),
        help="the haystack's text: validation (to choose settings on, the default) or heldout",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/passkey_digits"))
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except DashKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digits.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'digits.json'}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())

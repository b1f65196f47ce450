"""RULER-style synthetic long-context tasks built on real text.

Each task hides facts at chosen depths of a haystack of held-out Wikipedia text, asks for them
at the end and scores the model's greedy answer by exact matches:
  passkey           one 5-digit key (the classic passkey retrieval)
  multikey          several "magic numbers" for different words; ask for one (RULER niah_multikey)
  variable_tracking a chain X1 = 71532, X2 = X1, ... scattered over the text; ask for every name
                    that holds the value (RULER vt)
Prompts end with a question; instruct models answer best with it wrapped in their chat
template (`generate(..., chat=True)`): SmolLM2-135M-Instruct finds a passkey at every depth of
2K tokens that way, and misses the middle one when asked to complete "The pass key is".
"""

import dataclasses
import random
import re
from collections.abc import Sequence

from dashkv_jax import data
from dashkv_jax.errors import DashKVError

TASKS = ("passkey", "multikey", "variable_tracking")
WORDS = (
    "amber", "harbor", "violin", "glacier", "lantern", "meadow", "falcon", "copper",
    "orchid", "canyon", "thimble", "saffron", "quartz", "willow", "marble", "pepper",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance: the prompt, what a correct answer contains, and where it was hidden."""

    task: str
    prompt: str
    answers: tuple[str, ...]  # every one must appear in the output for full credit
    length: int  # the prompt's length in tokens
    depth: float  # where the (first) fact sits, as a fraction of the haystack
    # What a model without a chat template (a pretrained one) reads after the prompt, so that
    # it completes the answer rather than the question.
    cue: str = ""


def score(sample: Sample, output: str) -> float:
    """Fraction of `sample.answers` found in `output` as whole numbers or names."""
    found = set(re.findall(r"\w+", output))
    return sum(answer in found for answer in sample.answers) / len(sample.answers)


class Haystack:
    """Held-out text cut to a token count, with facts inserted at sentence boundaries."""

    def __init__(self, tokenizer, documents: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        if documents is None:
            documents = data.load_documents(split="heldout")["text"]
        self.ids = tokenizer.encode("\n\n".join(documents)).ids

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def build(self, length: int, facts: Sequence[tuple[float, str]], head: str, tail: str) -> str:
        """head + haystack with each (depth, sentence) inserted + tail, about `length` tokens."""
        room = length - self.tokens(head) - self.tokens(tail)
        room -= sum(self.tokens(" " + sentence) for _, sentence in facts)
        if room < 16:
            raise DashKVError(f"a {length}-token prompt leaves no room for the haystack")
        if room > len(self.ids):
            raise DashKVError(
                f"the held-out text has {len(self.ids)} tokens, fewer than the {room} needed"
            )
        text = self.tokenizer.decode(self.ids[:room])
        # Insert deepest first so earlier character offsets stay valid.
        for depth, sentence in sorted(facts, reverse=True):
            at = _sentence_boundary(text, int(depth * len(text)))
            text = f"{text[:at]} {sentence}{text[at:]}"
        return head + text + tail


def _sentence_boundary(text: str, near: int) -> int:
    """The character offset just after the first sentence end at or after `near` (else `near`)."""
    if near <= 0:
        return 0
    match = re.compile(r"[.!?](?=\s)").search(text, near)
    return match.end() if match else near


def passkey(haystack: Haystack, length: int, depth: float, seed: int = 0) -> Sample:
    key = str(random.Random(seed).randint(10000, 99999))
    head = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
        "memorize it.\n\n"
    )
    fact = f"The pass key is {key}. Remember it. {key} is the pass key."
    tail = "\n\nWhat is the pass key? Answer with the number only."
    prompt = haystack.build(length, [(depth, fact)], head, tail)
    return Sample("passkey", prompt, (key,), haystack.tokens(prompt), depth, "\nThe pass key is")


def multikey(haystack: Haystack, length: int, depth: float, seed: int = 0, keys: int = 4) -> Sample:
    """`keys` magic numbers for distinct words; the asked one sits at `depth`, the rest spread."""
    rng = random.Random(seed)
    words = rng.sample(WORDS, keys)
    numbers = [str(rng.randint(1000000, 9999999)) for _ in words]
    depths = [depth] + [rng.random() for _ in words[1:]]
    facts = [
        (d, f"One of the special magic numbers for {w} is: {n}.")
        for d, w, n in zip(depths, words, numbers, strict=True)
    ]
    head = "Some special magic numbers are hidden inside the following text. Memorize them.\n\n"
    asked = f"special magic number for {words[0]}"
    tail = f"\n\nWhat is the {asked}? Answer with the number only."
    prompt = haystack.build(length, facts, head, tail)
    cue = f"\nThe {asked} is:"
    return Sample("multikey", prompt, (numbers[0],), haystack.tokens(prompt), depth, cue)


def variable_tracking(
    haystack: Haystack, length: int, depth: float, seed: int = 0, hops: int = 3
) -> Sample:
    """A chain of `hops` + 1 assignments from `depth` on; every name in it holds the value."""
    rng = random.Random(seed)
    value = str(rng.randint(10000, 99999))
    names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(hops + 1)]
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    step = (1.0 - depth) / (hops + 1)
    facts = [(depth + i * step, s) for i, s in enumerate(statements)]
    head = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    tail = (
        f"\n\nQuestion: Find all variables that are assigned the value {value} in the text "
        f"above. Answer with the {hops + 1} variable names only."
    )
    prompt = haystack.build(length, facts, head, tail)
    cue = f"\nThe variables assigned {value} are:"
    return Sample("variable_tracking", prompt, tuple(names), haystack.tokens(prompt), depth, cue)


BUILDERS = {"passkey": passkey, "multikey": multikey, "variable_tracking": variable_tracking}


def make(task: str, haystack: Haystack, length: int, depth: float, seed: int = 0) -> Sample:
    """The `task` sample of about `length` tokens with its fact at `depth` in [0, 1]."""
    if task not in BUILDERS:
        raise DashKVError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if not 0.0 <= depth <= 1.0:
        raise DashKVError(f"depth must lie in [0, 1], got {depth}")
    return BUILDERS[task](haystack, length, depth, seed)

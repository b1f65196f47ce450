"""Tokenizers from GGUF metadata (byte-level BPE, SentencePiece BPE) and chat-template rendering."""

import jinja2
import jinja2.sandbox
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from dashkv_jax.errors import DashKVError

# GGUF token types (llama.cpp's llama_token_type): control and user-defined tokens are special.
_SPECIAL_TOKEN_TYPES = (3, 4)
_CONTROL, _USER_DEFINED = 3, 4
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    """The pre-tokenizer llama.cpp applies for GGUF's `tokenizer.ggml.pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    splits = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if pre in splits:
        split = pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    known = ", ".join(["default", "gpt2", "smollm", *splits])
    raise DashKVError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from GGUF `tokenizer.ggml.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta)
    else:
        raise DashKVError(
            f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece BPE 'llama' are); load the model's Hugging Face folder instead"
        )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_token = meta["tokenizer.ggml.tokens"][bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos)]
        )
    return tokenizer


def _byte_level_bpe(meta: dict) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    special = [tokens[i] for i, kind in enumerate(types) if kind in _SPECIAL_TOKEN_TYPES]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def spm_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary stored best-first (llama.cpp keeps
    the model's piece order; SentencePiece writes BPE pieces in the order it learned them).

    Every split of a piece into two pieces of the vocabulary is a merge, ranked by the merged
    piece's position; a piece's own splits go longest left part first.
    """
    known = set(pieces)
    merges = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def _sentencepiece_bpe(meta: dict) -> Tokenizer:
    """SentencePiece BPE (Gemma, Llama 2): spaces as "\u2581", byte fallback, merges from the
    piece order, control tokens special and user-defined ones matched whole."""
    # llama.cpp writes runs of SentencePiece spaces as real spaces ("  "); spell them back.
    pieces = [
        SPIECE_SPACE * len(t) if t and set(t) == {" "} else t for t in meta["tokenizer.ggml.tokens"]
    ]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(pieces)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise DashKVError("the GGUF vocabulary spells two tokens the same; cannot rebuild it")
    model = models.BPE(
        vocab,
        spm_merges(pieces),
        unk_token=None if unk is None else pieces[unk],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", SPIECE_SPACE)
    decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    # Llama 2's SentencePiece puts a space before the text; Gemma's does not.
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace])
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(decode)
    tokenizer.add_special_tokens(
        [
            AddedToken(p, special=True, normalized=False)
            for p, k in zip(pieces, types, strict=True)
            if k == _CONTROL
        ]
    )
    # User-defined tokens ("\n\n", "<table>") match whole, but runs of spaces come from merges
    # of the normalised text (as in transformers), so a literal "\u2581" is not one of them.
    tokenizer.add_tokens(
        [
            AddedToken(p, special=False, normalized=False)
            for p, k in zip(pieces, types, strict=True)
            if k == _USER_DEFINED and set(p) != {SPIECE_SPACE}
        ]
    )
    return tokenizer


def _raise(message: str):
    raise jinja2.TemplateError(message)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True):
    """Render chat `messages` ([{"role", "content"}]) with the model's Jinja chat template."""
    if not template:
        raise DashKVError("this model has no chat template; prompt it without --chat")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )

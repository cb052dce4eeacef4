"""Pre-splitting: special tokens first, then a regex cuts ordinary text into chunks.

BPE never merges across a chunk boundary, so the regex decides what a token can span: a
word with its leading space, up to three digits, a run of punctuation, a run of spaces.
The two patterns are the exact strings tiktoken uses for GPT-2 (``r50k_base``) and GPT-4
(``cl100k_base``), so our chunks and tiktoken's agree and its encoder can be our oracle.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from functools import lru_cache

import regex

# GPT-2: contractions, optional space + letters / digits / other, whitespace runs.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (cl100k): case-insensitive contractions, digits in groups of at most 3, newlines apart.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

AllowedSpecial = str | Collection[str]  # "none_raise" (default), "none", "all", or a set of tokens


def resolve_pattern(pattern: str) -> str:
    """A pattern name (``gpt2``, ``gpt4``) becomes its regex; any other string is a regex already."""
    return PATTERNS.get(pattern, pattern)


@lru_cache(maxsize=16)
def compiled(pattern: str) -> regex.Pattern:
    """The compiled regex of a pattern (name or regex string), compiled once per process."""
    return regex.compile(resolve_pattern(pattern))


def split_chunks(text: str, pattern: str) -> list[str]:
    """The chunks of ordinary text (no special-token handling); their concatenation is ``text``."""
    return compiled(pattern).findall(text)


def _special_regex(tokens: Collection[str]) -> regex.Pattern:
    # longest first so that "<|end|>" never shadows "<|endoftext|>" when both are registered
    ordered = sorted(tokens, key=lambda t: (-len(t), t))
    return regex.compile("(" + "|".join(regex.escape(t) for t in ordered) + ")")


def segments(
    text: str, special_tokens: Collection[str], allowed_special: AllowedSpecial = "none_raise"
) -> Iterator[tuple[str, bool]]:
    """Cut ``text`` into (piece, is_special) pairs, refusing special tokens that were not allowed.

    ``allowed_special`` is ``"none_raise"`` (the default: any registered special token's string
    in the text is an error, because user text must not be able to forge an <|endoftext|>),
    ``"none"`` (special strings are ordinary text), ``"all"``, or a set of the tokens allowed
    (any other registered special token found in the text is an error).
    """
    specials = set(special_tokens)
    if allowed_special == "none":
        allowed: set[str] = set()
    elif allowed_special == "all":
        allowed = specials
    elif allowed_special == "none_raise":
        allowed = set()
    elif isinstance(allowed_special, str):
        raise ValueError(
            f'allowed_special must be "none_raise", "none", "all" or a set of special tokens, '
            f"got the string {allowed_special!r}"
        )
    else:
        allowed = set(allowed_special)
        unknown = allowed - specials
        if unknown:
            raise ValueError(f"allowed_special names tokens that are not registered: {sorted(unknown)}")
    refused = set() if allowed_special == "none" else specials - allowed
    if refused:
        match = _special_regex(refused).search(text)
        if match:
            raise ValueError(
                f"text contains the special token {match.group()!r} at character {match.start()}; "
                f'pass allowed_special="all" (or a set naming it) to encode it as a special token, '
                f'or allowed_special="none" to encode it as plain text'
            )
    if not allowed:
        if text:
            yield text, False
        return
    for i, piece in enumerate(_special_regex(allowed).split(text)):
        if piece:
            yield piece, i % 2 == 1  # split() with one group alternates text, special, text, ...


def training_chunks(text: str, pattern: str, special_tokens: Collection[str] = ()) -> list[str]:
    """The chunks a trainer counts: special tokens are cut out (never merged), the rest split."""
    chunks: list[str] = []
    for piece, is_special in segments(text, special_tokens, "all"):
        if not is_special:
            chunks.extend(split_chunks(piece, pattern))
    return chunks

"""Cases for project 2: texts to train on, texts and ids to encode and decode, and the properties.

Merges in cases come from the naive (textbook) trainer on small texts (at most 50 merges) or,
for the "large text" cases, from one mid-size tokenizer trained once per session on the
start of the Shakespeare corpus. Patterns are passed as regexes, the form tiktoken takes.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Any

from hypothesis import strategies as st

from harness.cases import Cases
from impl.bpe import fast, naive
from impl.bpe.regex_split import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN
from impl.data.corpus import load_text, split_text

EOT = "<|endoftext|>"
PATTERNS = [GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN]
# pieces chosen to repeat (so merges happen and ties are common) and to cover what breaks tokenizers:
# multi-byte characters, combining marks, ZWJ emoji, control characters, CRLF, digit runs
PIECES = [
    "a",
    "b",
    "ab",
    "ba",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "'s",
    "'LL",
    "1",
    "12345",
    "!",
    "?!",
    "é",
    "e\u0301",
    "中文",
    "😀",
    "👩\u200d💻",
    "\x00",
    "\x1b",
    "\u2028",
    "ſ",
    "ǅ",
]
small_text = st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), st.text(max_size=40))
UNICODE = (
    "Ünïcödé ☃ 中文字符 日本語のテキスト 😀👍🏽 👩\u200d💻 e\u0301 a\u0308\u0304 \x00\x07\x1b\x7f \u200b\u2028 \ufeff"
)


@lru_cache(maxsize=1)
def mid_size() -> tuple[list[tuple[int, int]], str, str]:
    """(merges, train text, held-out text): 512 ids learned on 300 KB of Shakespeare (~0.3 s, once)."""
    train, heldout = split_text(load_text("shakespeare"))
    merges = fast.train_merges(train[:300_000], 512, GPT4_SPLIT_PATTERN)
    return merges, train[:300_000], heldout


def _merges(text: str, n: int, pattern: str = GPT4_SPLIT_PATTERN) -> list[tuple[int, int]]:
    return naive.train_merges(text, 256 + n, pattern)


def encode_case(
    text: str,
    merges,
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens=(),
    allowed_special: Any = "none_raise",
    id: str | None = None,
) -> dict[str, Any]:
    case = {
        "text": text,
        "merges": merges,
        "pattern": pattern,
        "special_tokens": list(special_tokens),
        "allowed_special": allowed_special,
    }
    return case | ({"id": id} if id else {})


@st.composite
def _encode_cases(draw) -> dict[str, Any]:
    pattern = draw(st.sampled_from(PATTERNS))
    train = draw(small_text)
    merges = _merges(train, draw(st.integers(0, 50)), pattern)
    text = draw(st.one_of(st.just(train), small_text, st.lists(st.sampled_from(PIECES + [EOT])).map("".join)))
    if draw(st.booleans()):  # a registered <|endoftext|>, encoded as a special token or as plain text
        return encode_case(text, merges, pattern, [EOT], draw(st.sampled_from(["all", "none", {EOT}])))
    return encode_case(text, merges, pattern)


# ---- trainers -------------------------------------------------------------------------------


def train_case(text: str, vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN, id: str | None = None) -> dict:
    return {"text": text, "vocab_size": vocab_size, "pattern": pattern} | ({"id": id} if id else {})


train_texts = Cases(
    edge=[
        train_case("aaabdaaabac", 259, id="textbook-aaabdaaabac"),
        train_case("", 300, id="empty-text"),
        train_case("a", 300, id="one-byte"),
        train_case("aaaaa aaaa aaa", 262, id="overlapping-pairs"),
        train_case("ab ba ab ba cd dc cd dc", 270, id="ties-everywhere"),
        train_case("ab" * 30, 300, id="runs-out-of-pairs"),
        train_case(UNICODE * 3, 306, id="unicode"),
        train_case(load_text("shakespeare")[:3000], 306, GPT2_SPLIT_PATTERN, id="shakespeare-gpt2"),
    ],
    strategy=st.builds(
        train_case, text=small_text, vocab_size=st.integers(256, 306), pattern=st.sampled_from(PATTERNS)
    ),
)

textbook = Cases(
    edge=[
        # Wikipedia's example: aa -> Z, ab -> Y, ZY -> X (Z=256, Y=257, X=258); "ZYdZYac"
        train_case("aaabdaaabac", 259, id="textbook-aaabdaaabac") | {"expected": [(97, 97), (97, 98), (256, 257)]},
        # overlaps merge left to right: "aaaa" -> [aa, aa] -> [aaaa]
        train_case("aaaa", 258, id="aaaa") | {"expected": [(97, 97), (256, 256)]},
    ]
)


def learns_expected_merges(fn, expected, **case) -> None:
    """The trainer reproduces the merges worked out by hand."""
    got = fn(**case)
    assert got == expected, f"learned {got} on {case['text']!r}, expected {expected}"


# ---- encoders -------------------------------------------------------------------------------


def _encode_edges() -> list[dict[str, Any]]:
    merges, _, heldout = mid_size()
    small = _merges(UNICODE + " the theme then there", 40)
    return [
        encode_case("", small, id="empty"),
        encode_case(UNICODE, small, id="unicode"),
        encode_case("   \n\n\n  \t  x   ", small, GPT2_SPLIT_PATTERN, id="whitespace-runs-gpt2"),
        encode_case("中文字符" * 200 + " " * 300, merges, id="long-chunks"),
        encode_case(heldout[:30_000], merges, id="shakespeare-30k-512-ids"),
        encode_case(f"a{EOT}b {EOT}{EOT}", merges, special_tokens=[EOT], allowed_special="all", id="special-allowed"),
        encode_case(f"a{EOT}b", merges, special_tokens=[EOT], allowed_special="none", id="special-as-text"),
    ]


encode_texts = Cases(edge=_encode_edges(), strategy=_encode_cases())


def assigned_in_python_unicode(case: dict[str, Any]) -> dict[str, Any]:
    """The case with characters unassigned in Python's Unicode database removed from its text.

    tiktoken's Rust regex and the ``regex`` module ship different Unicode versions, so they
    disagree on whether a recently assigned code point (e.g. U+3D000, a Seal-script letter in
    ``regex``'s Unicode 18 tables) is a letter, and split such text differently. That is a
    pre-tokenizer table difference, not a BPE one (see impl/bpe/README.md).
    """
    return case | {"text": "".join(c for c in case["text"] if unicodedata.category(c) != "Cn")}


large_texts = Cases(
    edge=_encode_edges() + [encode_case(mid_size()[2], mid_size()[0], id="shakespeare-heldout-500k")],
    strategy=_encode_cases().map(assigned_in_python_unicode),
)


# ---- special tokens -------------------------------------------------------------------------


def special_case(text: str, special_tokens=(EOT,), id: str | None = None) -> dict[str, Any]:
    case = {
        "text": text,
        "merges": _merges("hello world <|> endoftext", 30),
        "pattern": GPT4_SPLIT_PATTERN,
        "special_tokens": list(special_tokens),
    }
    return case | ({"id": id} if id else {})


special_texts = Cases(
    edge=[
        special_case(f"hello{EOT}world", id="middle"),
        special_case(f"{EOT}", id="alone"),
        special_case(f"{EOT}{EOT} x {EOT}", id="repeated"),
        special_case(f"a <|end|> b {EOT}", [EOT, "<|end|>"], id="prefix-named-tokens"),
    ],
    strategy=st.builds(
        lambda a, b, tok: special_case(a + tok + b, [EOT, "<|pad|>"]),
        small_text,
        small_text,
        st.sampled_from([EOT, "<|pad|>"]),
    ),
)


def refuses_special_unless_allowed(fn, text, merges, pattern, special_tokens) -> None:
    """Registered special tokens in user text raise by default; "all" maps them to their ids."""
    try:
        fn(text=text, merges=merges, pattern=pattern, special_tokens=special_tokens)
    except ValueError:
        pass
    else:
        raise AssertionError(f"encoding {text!r} did not refuse its special token")
    special_ids = {256 + len(merges) + i for i in range(len(special_tokens))}
    ids = fn(text=text, merges=merges, pattern=pattern, special_tokens=special_tokens, allowed_special="all")
    found = sum(text.count(t) for t in special_tokens)  # the tokens used here never overlap
    assert sum(i in special_ids for i in ids) == found, f"allowed_special='all' gave {ids} for {text!r}"
    ids = fn(text=text, merges=merges, pattern=pattern, special_tokens=special_tokens, allowed_special="none")
    assert not special_ids & set(ids), f"allowed_special='none' still produced special ids: {ids}"


# ---- decoders and round trips ---------------------------------------------------------------


def decode_case(ids: list[int], merges, special_tokens=(), id: str | None = None) -> dict[str, Any]:
    return {"ids": ids, "merges": merges, "special_tokens": list(special_tokens)} | ({"id": id} if id else {})


@st.composite
def _decode_cases(draw) -> dict[str, Any]:
    merges = _merges(draw(small_text), draw(st.integers(0, 50)))
    n_ids = 256 + len(merges) + 1
    return decode_case(draw(st.lists(st.integers(0, n_ids - 1), max_size=30)), merges, [EOT])


_dec_merges = _merges(UNICODE * 2, 50)
decode_ids = Cases(
    edge=[
        decode_case([], _dec_merges, id="empty"),
        decode_case([0xE4, 0xB8], _dec_merges, id="cut-cjk-character"),
        decode_case([0xF0, 0x9F, 0x98, 0x80], _dec_merges, id="emoji-from-bytes"),
        decode_case([0xFF, 0x41, 0x80, 0x80], _dec_merges, id="invalid-bytes"),
        decode_case([0xC0, 0xAF, 0xED, 0xA0, 0x80], _dec_merges, id="overlong-and-surrogate"),
        decode_case([0xF0, 0x9F, 0x41], _dec_merges, id="truncated-then-ascii"),
        decode_case(list(range(256, 256 + len(_dec_merges))), _dec_merges, id="every-merge"),
        decode_case([256 + len(_dec_merges), 0xE4], _dec_merges, [EOT], id="special-then-cut"),
    ],
    strategy=_decode_cases(),
)


@st.composite
def _roundtrip_cases(draw) -> dict[str, Any]:
    pattern = draw(st.sampled_from(PATTERNS))
    merges = _merges(draw(small_text), draw(st.integers(0, 50)), pattern)
    text = draw(st.one_of(small_text, st.text(), st.text(st.characters(codec="utf-8"), max_size=100)))
    return encode_case(text, merges, pattern)


_rt_merges = _merges(UNICODE * 2 + " hello hello world", 50)
roundtrip_texts = Cases(
    edge=[
        encode_case("", _rt_merges, id="empty"),
        encode_case(UNICODE, _rt_merges, id="unicode"),
        encode_case("日本語のテキスト" * 20, _rt_merges, id="cjk-run"),
        encode_case("👩\u200d👩\u200d👧\u200d👦🏳️\u200d🌈", _rt_merges, id="zwj-emoji"),
        encode_case("e\u0301\u0302\u0303 a\u0308", _rt_merges, GPT2_SPLIT_PATTERN, id="combining-marks-gpt2"),
        encode_case("\x00\x01\x1b[31m\r\n\t\x7f\x85", _rt_merges, id="control-characters"),
        encode_case("a\nb\rc d\u3000e", _rt_merges, GPT2_SPLIT_PATTERN, id="lone-whitespace-gpt2"),
        encode_case(f"x{EOT}y", _rt_merges, special_tokens=[EOT], allowed_special="all", id="special-token"),
        encode_case(mid_size()[2][:20_000], mid_size()[0], id="shakespeare-20k"),
    ],
    strategy=_roundtrip_cases(),
)


def decodes_to_input(fn, **case) -> None:
    """decode(encode(text)) gives back the text, character for character."""
    out = fn(**case)
    assert out == case["text"], f"round trip changed {case['text'][:80]!r} into {out[:80]!r}"

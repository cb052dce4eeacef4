"""Hugging Face ``tokenizers`` (Rust) byte-level BPE: the peer we compare compression and speed with.

Two ways in:
- ``train_tokenizer``: HF's own BPE trainer on the same text, split regex and vocabulary
  size (special tokens count toward it, as in ours): the compression yardstick;
- ``from_merges``: HF's encoder loaded with *our* merges: the speed yardstick for encoding.
Both pre-tokenize as ours does: the split regex isolates chunks, then GPT-2's byte-to-unicode
map turns bytes into the printable characters HF's BPE model works on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (so no token string holds a space or control)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pieces(text: str, size: int = 1 << 16) -> Iterator[str]:
    # feed the trainer ~64 KB pieces cut after a newline, so a cut never splits a chunk
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(
    text: str, vocab_size: int, pattern: str, special_tokens: Sequence[str] = ("<|endoftext|>",)
) -> Tokenizer:
    """HF's byte-level BPE trained on ``text`` to ``vocab_size`` ids (bytes + merges + specials)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pattern)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, as in ours
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(text), trainer)
    return tok


def from_merges(merges: Sequence[Sequence[int]], pattern: str, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """HF's BPE encoder with our merges: token ids equal ours (id = 256 + merge index)."""
    byte_char = bytes_to_unicode()
    strings = [byte_char[b] for b in range(256)]
    for a, b in merges:
        strings.append(strings[a] + strings[b])
    vocab = {s: i for i, s in enumerate(strings)}
    if len(vocab) != len(strings):
        raise ValueError("these merges create two tokens with the same bytes; HF's vocabulary cannot hold both")
    pairs = [(strings[a], strings[b]) for a, b in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = _pre_tokenizer(pattern)
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
    return tok


def encode_ids(tok: Tokenizer, text: str) -> list[int]:
    """HF's ids for ``text`` (no special tokens added around it)."""
    return tok.encode(text, add_special_tokens=False).ids


def bytes_per_token(tok: Tokenizer, text: str) -> float:
    """UTF-8 bytes of ``text`` divided by the number of tokens HF encodes it into."""
    return len(text.encode("utf-8")) / len(encode_ids(tok, text))

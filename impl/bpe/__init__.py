"""Byte-level BPE tokenizer (project 2): naive and fast trainers and encoders, special tokens,
save/load, and the training pipeline that produces the default 10K tokenizer.

    from impl.bpe import load, default_tokenizer_path
    tok = load(default_tokenizer_path())      # trains it on first use (seconds)
    ids = tok.encode("To be, or not to be")
    tok.decode(ids), tok.vocab_size, tok.eot_id
"""

from impl.bpe.pipeline import default_tokenizer, default_tokenizer_path, train_tokenizer
from impl.bpe.regex_split import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN
from impl.bpe.tokenizer import ENDOFTEXT, Tokenizer, load, train

__all__ = [
    "ENDOFTEXT",
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "Tokenizer",
    "default_tokenizer",
    "default_tokenizer_path",
    "load",
    "train",
    "train_tokenizer",
]

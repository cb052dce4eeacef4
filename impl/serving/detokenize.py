"""Incremental detokenization: turn a stream of token ids into a stream of text pieces whose concatenation is
exactly the one-shot decode of all the ids, with stop strings cut.

Two traps, both about text that is not final yet:

- A byte-level BPE token can end in the middle of a UTF-8 character (an emoji is 4 bytes, often 2 tokens).
  Decoding token by token would emit U+FFFD for each half; decoding everything so far and diffing would emit
  a U+FFFD and then have to take it back. We keep the raw bytes and feed them to an incremental UTF-8 decoder
  (``errors="replace"``), which holds an incomplete trailing sequence back until the next bytes complete it
  (or, at the end, replaces it, exactly as ``bytes.decode(errors="replace")`` does on the whole).
- A stop string can straddle two steps ("Hu" + "man:"). We hold back the last ``len(longest stop) - 1``
  characters until we know they do not start a stop string; when one appears, the text ends before it.

Stop *ids* (the model's end token) never reach the text: the engine ends the request on them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class IncrementalDetokenizer:
    """Feed ids with ``add(ids) -> new text``; ``finish() -> the rest``. ``stopped`` turns True when a stop
    string was found (the caller aborts the request); ``text`` is everything emitted so far."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_ids = set(skip_ids)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded, not emitted: may be the start of a stop string
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.stopped = False

    def add(self, ids: Iterable[int]) -> str:
        """The text that is final after these ids (possibly ``""``)."""
        if self.stopped:
            return ""
        data = b"".join(self.tokenizer.token_bytes(i) for i in ids if i not in self.skip_ids)
        self._pending += self._decoder.decode(data, final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back text at the end of the request (an incomplete UTF-8 tail becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends right before it
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final or len(self._pending) <= self._hold:
            out, self._pending = (self._pending, "") if final else ("", self._pending)
        else:
            keep = len(self._pending) - self._hold
            out, self._pending = self._pending[:keep], self._pending[keep:]
        self.text += out
        return out


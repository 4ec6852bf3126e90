"""Token ids -> text pieces for streaming: incremental (whole UTF-8 characters) and stop strings."""

from __future__ import annotations

from coinfer.model.tokenizer import IncrementalDecoder, Tokenizer


class TextAssembler:
    """push(token) returns the text that is safe to emit now.

    Text that might be the start of a stop string is held back until it is either
    completed (then it and everything after it is dropped, `stopped` turns True) or ruled out.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._dec = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.push(token_id)
        if not self.stop:
            out, self._pending = self._pending, ""
            return out
        hits = [i for s in self.stop if (i := self._pending.find(s)) >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[: min(hits)], "", True
            return out
        hold = max(
            (
                n
                for s in self.stop
                for n in range(1, min(len(s), len(self._pending)) + 1)
                if self._pending.endswith(s[:n])
            ),
            default=0,
        )
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (no stop string completed)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

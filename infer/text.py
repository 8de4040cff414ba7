"""Host-side text of generation: incremental detokenization and stop strings.

`TextStream` turns one sequence's generated token ids into text pieces as they
arrive. Byte-level BPE may split one character over several tokens (emoji,
CJK), so a piece never ends in the U+FFFD of an incomplete UTF-8 sequence: that
tail waits for the token that completes it. Only a window of recent tokens is
decoded per token, starting at the last token boundary that fell on a character
boundary (the prefix-offset scheme of vLLM's detokenizer), so the pieces
concatenate to exactly `tokenizer.decode(all_ids)`.

Stop strings are matched on the decoded text, across token boundaries. The stop
string that a left-to-right reader completes first wins (ties: the one starting
first); the text is cut before it. `truncate_at_stop` applies the same rule to a
finished text.
"""

from __future__ import annotations

from typing import Iterable

from flaxlm.model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields


def check_stop(stop: Iterable[str]) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings, or a ValueError naming the setting."""
    if isinstance(stop, str):
        raise ValueError(f"stop must be a sequence of strings, not the string {stop!r}")
    stops = tuple(stop)
    for item in stops:
        if not isinstance(item, str) or not item:
            raise ValueError(f"stop must hold non-empty strings; got {item!r}")
    return stops


def find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Start index of the stop string that ends first in `text` (ties: the longest), or None."""
    best: tuple[int, int] | None = None  # (end, start)
    for item in stop:
        start = text.find(item)
        if start >= 0 and (best is None or (start + len(item), start) < best):
            best = (start + len(item), start)
    return None if best is None else best[1]


def truncate_at_stop(text: str, stop: Iterable[str]) -> tuple[str, bool]:
    """`text` cut before its first stop string, and whether one was found."""
    start = find_stop(text, check_stop(stop))
    return (text, False) if start is None else (text[:start], True)


def _held_from(text: str, stop: tuple[str, ...]) -> int:
    """Earliest index from which `text`'s suffix could still grow into a stop string (len(text) if none)."""
    longest = max((len(item) for item in stop), default=1)
    for index in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[index:]
        if any(item.startswith(tail) for item in stop):
            return index
    return len(text)


class TextStream:
    """Incremental text of one sequence's generated tokens, cut at stop strings.

    `push(ids)` returns the text that became final since the last call; `finish()`
    ends generation and returns what was held back. After a stop string is found
    `stopped` is true, `finish_reason` is "stop", `text` is the final text and
    `num_tokens` counts the tokens up to and including the one that completed it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stop = check_stop(stop)
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._window_start = 0  # decode(ids[:window_start]) ends on a character boundary
        self._window_sent = 0  # characters of decode(ids[window_start:]) already passed on
        self._held = ""  # decoded text that may still begin a stop string
        self._text = ""  # text returned so far
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """All text returned so far (the final text once finished)."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """The tokens consumed: all pushed, or those up to the one that completed a stop string."""
        return list(self._ids)

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def stopped(self) -> bool:
        """True once a stop string was found."""
        return self.finish_reason == "stop"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_ids: Iterable[int]) -> str:
        """Consume generated tokens; return the new text that can no longer change or be cut."""
        pieces = []
        for token in token_ids:
            if self.finished:
                break
            self._ids.append(int(token))
            pieces.append(self._release(self._held + self._decode_new(), final=False))
        return "".join(pieces)

    def finish(self, reason: str = "length") -> str:
        """End generation: release held-back text; `reason` becomes the finish reason unless already set."""
        if self.finished:
            return ""
        tail = self._decode_new(final=True)
        piece = self._release(self._held + tail, final=True)
        if self.finish_reason is None:
            self.finish_reason = reason
        return piece

    def _decode_new(self, final: bool = False) -> str:
        """Characters decoded since the last call, without an incomplete trailing character unless `final`."""
        window = self._tokenizer.decode(self._ids[self._window_start:], skip_special_tokens=self._skip_special)
        complete = window if final else window.rstrip(REPLACEMENT)
        new = complete[self._window_sent:]
        if complete == window:  # ends on a character boundary: the next window starts here
            self._window_start, self._window_sent = len(self._ids), 0
        else:
            self._window_sent = len(complete)
        return new

    def _release(self, pending: str, final: bool) -> str:
        """Pass on the part of `pending` that cannot begin a stop string; stop at a complete one."""
        start = find_stop(pending, self._stop)
        if start is not None:
            self._held, self.finish_reason = "", "stop"
            self._text += pending[:start]
            return pending[:start]
        held_from = len(pending) if final else _held_from(pending, self._stop)
        self._held = pending[held_from:]
        self._text += pending[:held_from]
        return pending[:held_from]

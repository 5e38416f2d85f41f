"""Map generated token ids to the characters they add to the decoded text.

Pure: takes the tokenizer's `decode` as a callable. Byte-level BPE may split one
character over several tokens; such tokens add "" until the character completes, so
offsets stay exact (`"".join(pieces) == decode(ids)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Tokens of context re-decoded before each new token: enough for any merge or
# UTF-8 sequence to resolve, small enough to keep the pass linear.
_WINDOW = 6


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """pieces[i] = the text token i adds when `ids` are decoded left to right."""
    ids = list(ids)
    pieces: list[str] = []
    pending_from = 0  # first token not yet given its characters
    for i in range(len(ids)):
        start = max(0, pending_from - _WINDOW)
        before = decode(ids[start:pending_from])
        after = decode(ids[start:i + 1])
        if after.endswith("\ufffd") or not after.startswith(before):
            continue  # incomplete character (or unstable prefix): wait for more tokens
        pieces.extend([""] * (i - pending_from))
        pieces.append(after[len(before):])
        pending_from = i + 1
    if pending_from < len(ids):  # trailing incomplete bytes decode as they are
        start = max(0, pending_from - _WINDOW)
        tail = decode(ids[start:])[len(decode(ids[start:pending_from])):]
        pieces.extend([""] * (len(ids) - pending_from - 1))
        pieces.append(tail)
    if "".join(pieces) != decode(ids):
        return _exact_pieces(decode, ids)
    return pieces


def _exact_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Quadratic fallback for tokenizers whose decoding is not prefix-stable."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = decode(ids[:i + 1])
        if text.startswith(previous) and not text.endswith("\ufffd"):
            pieces.append(text[len(previous):])
            previous = text
        else:
            pieces.append("")
    full = decode(ids)
    if full.startswith(previous):
        pieces[-1:] = [pieces[-1] + full[len(previous):]] if pieces else []
    return pieces

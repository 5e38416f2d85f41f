"""Map generated token ids to the characters they add to the decoded text.

Pure: takes the tokenizer's `decode` as a callable (and optionally a batched one, see
`batch_decoder`). Byte-level BPE may split one character over several tokens; such tokens
add "" until the character completes, so offsets stay exact
(`"".join(pieces) == decode(ids)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Tokens of context re-decoded before each new token: enough for any merge or
# UTF-8 sequence to resolve, small enough to keep the pass linear.
_WINDOW = 6


def batch_decoder(tokenizer, skip_special_tokens: bool = True
                  ) -> Callable[[list[list[int]]], list[str]] | None:
    """The tokenizer's native batched decode (one call for many id lists, no Python per
    list), where it returns exactly what `tokenizer.decode` does: a Hugging Face fast
    tokenizer that does not clean up spaces. None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch") or getattr(
            tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return lambda batch: backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int],
                 decode_many: Callable[[list[list[int]]], list[str]] | None = None
                 ) -> list[str]:
    """pieces[i] = the text token i adds when `ids` are decoded left to right.

    `decode_many` (a batched `decode`, same strings) decodes every token's windows in one
    call up front; tokens that complete no character fall back to `decode`."""
    ids = list(ids)
    windows = _one_token_windows(ids, decode_many) if decode_many and ids else None
    pieces: list[str] = []
    pending_from = 0  # first token not yet given its characters
    for i in range(len(ids)):
        start = max(0, pending_from - _WINDOW)
        if windows is not None and pending_from == i:
            before, after = windows[2 * i], windows[2 * i + 1]
        else:
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


def _one_token_windows(ids: list[int],
                       decode_many: Callable[[list[list[int]]], list[str]]) -> list[str]:
    """[decode(ids[s:i]), decode(ids[s:i + 1]), ...] for each i, s = max(0, i - _WINDOW):
    what the loop in `token_pieces` decodes whenever token i starts a new character."""
    batch = []
    for i in range(len(ids)):
        start = max(0, i - _WINDOW)
        batch += [ids[start:i], ids[start:i + 1]]
    return decode_many(batch)


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

"""token_pieces: the batched fast path gives exactly the pieces of the one-by-one path."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepzip.tokens import batch_decoder, token_pieces

# ASCII, accents, CJK, emoji (4-byte), flags (two code points), newlines, a special token.
ALPHABET = st.sampled_from(list("ab 7.=+\n") + ["é", "中", "😀", "🇩🇪", "<|im_end|>", "\n\n"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(ALPHABET, min_size=0, max_size=40))
def test_batched_pieces_equal_one_by_one(smollm2_tokenizer, parts) -> None:
    tok = smollm2_tokenizer
    ids = tok(("".join(parts)), add_special_tokens=False)["input_ids"]
    decode = lambda x: tok.decode(x, skip_special_tokens=True)
    many = batch_decoder(tok)
    assert many is not None  # a fast byte-level BPE tokenizer without space clean-up
    fast = token_pieces(decode, ids, many)
    assert fast == token_pieces(decode, ids)
    assert "".join(fast) == decode(ids)


def test_token_split_inside_a_character_adds_nothing_until_it_completes(
        smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("x😀y", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(lambda x: tok.decode(x), ids, batch_decoder(tok, False))
    assert "".join(pieces) == "x😀y"
    assert "😀" in pieces  # whole, on the token that completes it
    assert len(pieces) == len(ids)


def test_no_batched_decode_where_it_could_differ() -> None:
    class CleansSpaces:
        clean_up_tokenization_spaces = True
        backend_tokenizer = object()

    class Slow:
        clean_up_tokenization_spaces = False

    assert batch_decoder(CleansSpaces()) is None
    assert batch_decoder(Slow()) is None

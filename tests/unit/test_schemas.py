"""Request schemas accept exactly what the pure code can apply: a variant the API takes
never fails inside `compress` after the model has generated (it used to answer 500 for
an adaptive variant with a negative `ratio`)."""

from __future__ import annotations

import pydantic
from hypothesis import given
from hypothesis import strategies as st

from stepzip.compression import PruneSpec, compress
from stepzip.schemas.compress import VariantSpec
from stepzip.steps import segment, token_char_offsets

PIECES = ["Tom has 3.", "\n", "He buys 4.", "\n", "3 + 4 = 7.", "\n", "So 7."]
ENTROPIES = [0.3, 0.1, 1.2, 0.1, 0.05, 0.1, 0.9]
TEXT = "".join(PIECES)
OFFSETS = token_char_offsets(PIECES)
STEPS = segment(TEXT, OFFSETS, ENTROPIES, delimiter="\n", span=(0, len(TEXT)))

numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, 0.5, 1.0, -1e-9, 1 + 1e-9, -2e167, 6.5e81]))


@given(strategy=st.sampled_from(["low", "high", "random", "token", "adaptive"]),
       ratio=numbers, threshold=numbers, mass=numbers,
       seed=st.integers(min_value=0, max_value=2**63 - 1))
def test_an_accepted_variant_always_compresses(strategy, ratio, threshold, mass, seed):
    try:
        v = VariantSpec(strategy=strategy, ratio=ratio, threshold=threshold, mass=mass,
                        seed=seed)
    except pydantic.ValidationError:
        return
    out = compress(STEPS, PruneSpec(strategy=v.strategy, ratio=v.ratio, seed=v.seed,
                                    threshold=v.threshold, mass=v.mass),
                   token_entropies=ENTROPIES, token_offsets=OFFSETS, text=TEXT, delimiter="\n")
    assert out.n_steps == len(STEPS)


def test_adaptive_with_a_ratio_outside_the_unit_interval_is_refused_up_front():
    try:
        VariantSpec(strategy="adaptive", threshold=6.5e81, ratio=-2.3e167)
    except pydantic.ValidationError as exc:
        assert "ratio" in str(exc)
    else:
        raise AssertionError("accepted a ratio compress() rejects")

"""A penalised request on the real CPU engine (legacy runner) returns the entropy of the
distribution after its penalties, as Model Runner V2 would report it: a transformers
teacher-forced forward pass in float64, with V2's penalty rule applied per position."""

from __future__ import annotations

import torch
from penalty_oracle import entropy64, v2_penalised_rows

TOLERANCE = 1e-3  # nats, as the entropy oracle (conftest.TOLERANCE)

PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.4, "repetition_penalty": 1.4}


def test_penalised_entropies_match_the_v2_order_oracle(client, reference_model):
    model, _tokenizer = reference_model
    body = {"model": "smollm2", "prompt": "List the numbers one, two, three, one, two,",
            "max_tokens": 16, "temperature": 0.0, "return_token_ids": True,
            "stepzip": {"entropies": True}, **PENALTIES}
    choice = client.completions(body)["choices"][0]
    prompt, out = choice["prompt_token_ids"], choice["token_ids"]
    got = choice["stepzip"]["entropies"]
    assert len(got) == len(out) > 0
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0].double()  # [seq, vocab]
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(out)]
    penalised = v2_penalised_rows(rows, prompt, out, PENALTIES)
    want = [entropy64(r) for r in penalised]
    plain = [entropy64(r) for r in rows]
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= TOLERANCE, f"worst |diff| {worst:.2e} vs the after-penalties oracle"
    assert max(abs(a - b) for a, b in zip(want, plain)) > 10 * TOLERANCE  # orders differ
    print(f"\npenalised request: worst |diff| vs V2-order oracle {worst:.2e} nats "
          f"over {len(out)} tokens")

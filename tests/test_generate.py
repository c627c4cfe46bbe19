"""Routed generation (KV cache, one token at a time) agrees with routed teacher forcing."""

import torch
from conftest import random_expert

from phatgoose.library import ExpertLibrary
from phatgoose.routing import route, routed_modules


def test_routed_generate_matches_teacher_forced_forward(base, tmp_path):
    dirs = [random_expert(base, tmp_path / f"e{i}", seed=i) for i in range(3)]
    route(base.model, ExpertLibrary.build(tmp_path / "lib", dirs), top_k=2)
    assert len(routed_modules(base.model)) == (7 * 2 if not base.is_seq2seq else 7 * 2 + 11 * 2)
    prompt = torch.randint(2, 200, (2, 7))
    out = base.model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False,
                              min_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0)
    steps = torch.stack(out.logits, dim=1)  # (batch, new tokens, vocab)
    if base.is_seq2seq:
        decoder = out.sequences[:, :-1]
        logits = base.model(input_ids=prompt, decoder_input_ids=decoder).logits
        generated = out.sequences[:, 1:]
    else:
        logits = base.model(input_ids=out.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
        generated = out.sequences[:, prompt.shape[1] :]
    assert torch.equal(logits.argmax(-1), generated)
    torch.testing.assert_close(logits, steps, atol=1e-4, rtol=1e-4)

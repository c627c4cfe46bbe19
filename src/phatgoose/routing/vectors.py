"""Routing vectors computed from a library and data ("transforms"), stored beside each expert.

Average activation (a PHATGOOSE baseline): an expert's routing vector at a module is the mean
of that module's inputs over (up to) 1000 of the expert's training examples, mean over each
example's tokens then over examples, computed with the expert's own LoRA active."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from phatgoose.data.encode import IGNORE, collate, encode
from phatgoose.data.tasks import Example
from phatgoose.errors import LibraryError
from phatgoose.library.expert import write_safetensors
from phatgoose.library.library import ExpertLibrary
from phatgoose.models import BaseModel
from phatgoose.routing.attach import AVERAGE_ACTIVATION, route, routed_modules, unroute


def _token_mask(module: str, batch: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    """Which positions of a module's input are real tokens: encoder tokens for the encoder and
    for cross-attention keys/values, target tokens for the rest of a decoder."""
    if not seq2seq or module.startswith("encoder.") or "EncDecAttention.k" in module \
            or "EncDecAttention.v" in module:
        return batch["attention_mask"].bool()
    return batch["labels"] != IGNORE


@torch.no_grad()
def average_activations(
    base: BaseModel, library: ExpertLibrary, name: str, examples: list[Example],
    max_examples: int = 1000, batch_size: int = 8, max_input_tokens: int = 512,
    max_target_tokens: int = 512,
) -> dict[str, torch.Tensor]:
    """{module: mean input (d_in,)} of expert ``name`` over its examples (prompt + target)."""
    examples = examples[:max_examples]
    if not examples:
        raise LibraryError(f"no examples to average the activations of expert {name!r} over")
    route(base.model, library, method=f"single:{name}")
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(module_name):
        def record(_, args):
            x = args[0].float()
            mask = current["masks"][module_name].to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            per_example = (x * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d_in)
            sums[module_name] = sums.get(module_name, 0) + per_example.sum(0)
        return record

    try:
        for module_name, module in routed_modules(base.model).items():
            hooks.append(module.register_forward_pre_hook(hook(module_name)))
        device = next(base.model.parameters()).device
        encoded = [encode(base.tokenizer, e.prompt, e.continuation, base.is_seq2seq,
                          max_input_tokens, max_target_tokens) for e in examples]
        for i in tqdm(range(0, len(encoded), batch_size), desc=f"activations {name}",
                      unit="batch", leave=False, dynamic_ncols=True):
            batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size],
                                                          base.tokenizer.pad_token_id,
                                                          base.is_seq2seq).items()}
            current["masks"] = {m: _token_mask(m, batch, base.is_seq2seq) for m in
                                routed_modules(base.model)}
            inputs = batch if base.is_seq2seq else {k: v for k, v in batch.items()
                                                    if k != "labels"}
            base.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        unroute(base.model)
    return {m: s / len(examples) for m, s in sums.items()}


def store_average_activations(
    base: BaseModel, library: ExpertLibrary, examples: dict[str, list[Example]],
    max_examples: int = 1000, batch_size: int = 8, max_input_tokens: int = 512,
    max_target_tokens: int = 512,
) -> list[str]:
    """Compute and store (``<expert>/average_activation.safetensors``) the vectors of every
    expert named in ``examples``, unless vectors made with the same settings are stored.
    Returns the experts computed anew."""
    computed = []
    for name, data in examples.items():
        settings = json.dumps({"examples": min(len(data), max_examples),
                               "max_input_tokens": max_input_tokens,
                               "max_target_tokens": max_target_tokens}, sort_keys=True)
        path = library.expert_dir(name) / AVERAGE_ACTIVATION
        if path.exists() and _stored_settings(path) == settings:
            continue
        started = time.time()
        vectors = average_activations(base, library, name, data, max_examples, batch_size,
                                      max_input_tokens, max_target_tokens)
        write_safetensors(path, vectors, {"settings": settings,
                                          "seconds": f"{time.time() - started:.1f}",
                                          "device": base.device_name})
        computed.append(name)
    return computed


def _stored_settings(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("settings")

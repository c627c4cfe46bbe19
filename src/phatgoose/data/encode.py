"""Tokenising (prompt, continuation) pairs for training and scoring, causal or seq2seq.

Causal LM: the sequence is prompt + continuation and only continuation tokens carry labels.
Seq2seq: the prompt is the encoder input and the continuation the decoder target. Prompts are
truncated from the left (the end, with "Answer:", is kept), continuations from the right."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # causal: aligned with input_ids (IGNORE on the prompt); seq2seq: decoder


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    continuation: str,
    seq2seq: bool,
    max_input_tokens: int = 512,
    max_target_tokens: int = 512,
    add_eos: bool = True,
) -> Encoded:
    prompt_ids = tokenizer(prompt).input_ids[-max_input_tokens:]
    target_ids = tokenizer(continuation, add_special_tokens=False).input_ids[:max_target_tokens]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    if seq2seq:
        return Encoded(prompt_ids, target_ids)
    return Encoded(prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids)


def collate(batch: list[Encoded], pad_id: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    """Right-pad a batch into model inputs with ``labels`` (IGNORE where padded)."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    label_width = max(len(e.labels) for e in batch)
    labels = torch.full((len(batch), label_width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def token_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], seq2seq: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labels and the mask of scored tokens, both
    (batch, scored positions). For causal models the logits at t predict token t+1, and only
    the positions that predict a label are run through the output head (``logits_to_keep``),
    which saves the vocabulary projection and softmax everywhere else."""
    labels = batch["labels"]
    if seq2seq:
        logits = model(**batch).logits
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = labels[:, 1:]
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            keep = (labels != IGNORE).any(0).nonzero().flatten()
            logits = model(**inputs, logits_to_keep=keep).logits
            labels = labels[:, keep]
        else:
            logits = model(**inputs).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels != IGNORE
    return -picked * mask, mask

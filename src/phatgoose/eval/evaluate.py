"""Evaluation: rank classification (multiple choice) and greedy generation (exact match).

Rank classification scores each choice by its mean per-token NLL given the prompt
(length-normalised) and predicts the lowest; a hit is any of the correct choices. Generation
decodes greedily and compares the first generated line, whitespace-normalised, to the targets."""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from phatgoose.data.encode import collate, encode, token_nll
from phatgoose.data.tasks import Example
from phatgoose.experts.loop import autocast, inference_autocast
from phatgoose.library.expert import write_text
from phatgoose.models import BaseModel

CHOICE_TOKENS = 2048  # choice tokens per forward when scoring choices on a shared prompt


@dataclass
class EvalConfig:
    batch_size: int = 16  # sequences (choices) per forward pass
    max_input_tokens: int = 512
    max_target_tokens: int = 512
    max_new_tokens: int = 32  # generation tasks
    bf16: bool | None = None  # bf16 autocast; None (default): where it is faster, as
    # models.bf16_is_faster says (same accuracy as fp32 in the full benchmark)
    share_prompt: bool = True  # causal LMs: run each prompt once and score its choices from
    # its KV cache (same scores as one full forward per choice, far fewer tokens)


@dataclass
class TaskResult:
    task: str
    kind: str  # "multiple_choice" or "generation"
    accuracy: float
    predictions: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.predictions)


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


@torch.no_grad()
def choice_nll(base: BaseModel, examples: list[Example], config: EvalConfig) -> list[list[float]]:
    """Mean per-token NLL of every choice of every example (lower is better)."""
    params = inspect.signature(base.model.forward).parameters
    if config.share_prompt and not base.is_seq2seq and "logits_to_keep" in params:
        return _shared_prompt_nll(base, examples, config)
    return _full_forward_nll(base, examples, config)


def _shared_prompt_nll(
    base: BaseModel, examples: list[Example], config: EvalConfig
) -> list[list[float]]:
    """Score choices from the KV cache of their prompt: ``batch_size`` prompts of similar
    length per forward (left-padded, positions counted from each prompt's first token), then
    every choice of those examples in one more forward on the cache.

    Exact: each token is routed on its own and attends only to its own example's tokens, so
    the scores are those of one unpadded full forward per choice."""
    tok = base.tokenizer
    prompts = [tok(e.prompt).input_ids[-config.max_input_tokens :] for e in examples]
    choices = [[tok(" " + c, add_special_tokens=False).input_ids[: config.max_target_tokens]
                for c in e.choices] for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # little padding
    scores: list[list[float]] = [[] for _ in examples]
    bar = tqdm(total=len(examples), desc="scoring", unit="example", leave=False,
               dynamic_ncols=True)
    for start in range(0, len(order), config.batch_size):
        group = order[start : start + config.batch_size]
        rows = _score_on_shared_prompts(base, [prompts[i] for i in group],
                                        [choices[i] for i in group], config)
        for i, row in zip(group, rows):
            scores[i] = row
        bar.update(len(group))
    bar.close()
    return scores


def _score_on_shared_prompts(
    base: BaseModel, prompts: list[list[int]], choices: list[list[list[int]]],
    config: EvalConfig,
) -> list[list[float]]:
    model, pad = base.model, base.tokenizer.pad_token_id
    device = next(model.parameters()).device
    width_p = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width_p), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[b, width_p - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width_p - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(config.bf16, device):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # predicts each choice's 1st token
    owner = [b for b, cs in enumerate(choices) for _ in cs]  # the example of each choice
    flat = [c for cs in choices for c in cs]
    nll = [-first[b, c[0]].item() if c else 0.0 for b, c in zip(owner, flat)]
    # transformers >= 5.2x names it `cache`; older versions `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    cache = getattr(out, key)
    # feed every choice but its last token on the prompts' cache, choices of about the same
    # length together (widths 2, 3-4, 5-8, ...) so that little compute goes to padding, and at
    # most CHOICE_TOKENS tokens per forward (its logits are tokens x vocabulary floats)
    buckets: dict[int, list[int]] = {}
    for j, c in enumerate(flat):
        if len(c) > 1:
            buckets.setdefault((len(c) - 2).bit_length(), []).append(j)
    chunks = []
    for rows in buckets.values():
        step = max(1, CHOICE_TOKENS // max(len(flat[j]) - 1 for j in rows))
        chunks += [rows[i : i + step] for i in range(0, len(rows), step)]
    for rows in chunks:
        width = max(len(flat[j]) for j in rows) - 1
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.zeros_like(ids)
        cmask = torch.zeros((len(rows), width_p + width), dtype=torch.long)
        cmask[:, :width_p] = mask[[owner[j] for j in rows]]
        for r, j in enumerate(rows):
            c = flat[j]
            ids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            targets[r, : len(c) - 1] = torch.tensor(c[1:], dtype=torch.long)
            cmask[r, width_p : width_p + len(c) - 1] = 1
        lengths = torch.tensor([len(prompts[owner[j]]) for j in rows])
        rows_cache = copy.deepcopy(cache) if len(chunks) > 1 else cache
        rows_cache.batch_select_indices(torch.tensor([owner[j] for j in rows], device=device))
        with autocast(config.bf16, device):
            logits = model(input_ids=ids.to(device), attention_mask=cmask.to(device),
                           position_ids=(lengths[:, None] + torch.arange(width)).to(device),
                           use_cache=True, **{key: rows_cache}).logits
        # NLL of each fed token's successor: logsumexp - logit, without a (n, W, vocab) copy
        token_nll = (torch.logsumexp(logits, -1).float()
                     - logits.gather(-1, targets.to(device)[..., None])[..., 0].float())
        token_nll = (token_nll * cmask[:, width_p:].to(device)).sum(-1).tolist()
        for j, value in zip(rows, token_nll):
            nll[j] += value
    scores = [total / max(len(c), 1) for total, c in zip(nll, flat)]
    rows, start = [], 0
    for cs in choices:
        rows.append(scores[start : start + len(cs)])
        start += len(cs)
    return rows


def _full_forward_nll(
    base: BaseModel, examples: list[Example], config: EvalConfig
) -> list[list[float]]:
    """One full forward per (example, choice), batched across examples."""
    pairs = [
        encode(base.tokenizer, e.prompt, " " + c, base.is_seq2seq, config.max_input_tokens,
               config.max_target_tokens, add_eos=False)
        for e in examples for c in e.choices
    ]
    device = next(base.model.parameters()).device
    pad = base.tokenizer.pad_token_id
    flat: list[float] = []
    for i in tqdm(range(0, len(pairs), config.batch_size), desc="scoring", unit="batch",
                  leave=False, dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate(pairs[i : i + config.batch_size], pad,
                                                      base.is_seq2seq).items()}
        with autocast(config.bf16, device):
            nll, mask = token_nll(base.model, batch, base.is_seq2seq)
        flat += (nll.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    scores, start = [], 0
    for e in examples:
        scores.append(flat[start : start + len(e.choices)])
        start += len(e.choices)
    return scores


@torch.no_grad()
def generate(base: BaseModel, examples: list[Example], config: EvalConfig) -> list[str]:
    """Greedy answers (first generated line) with the KV cache."""
    tokenizer, model = base.tokenizer, base.model
    device = next(model.parameters()).device
    # pad and truncate on the left: prompts end where the answer starts
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    answers: list[str] = []
    try:
        for i in tqdm(range(0, len(examples), config.batch_size), desc="generating",
                      unit="batch", leave=False, dynamic_ncols=True):
            prompts = [e.prompt for e in examples[i : i + config.batch_size]]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                               max_length=config.max_input_tokens).to(device)
            with autocast(config.bf16, device):
                out = model.generate(**inputs, max_new_tokens=config.max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            if not base.is_seq2seq:
                out = out[:, inputs["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                answers.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return answers


def evaluate_task(
    base: BaseModel, task: str, examples: list[Example], config: EvalConfig | None = None
) -> TaskResult:
    config = config or EvalConfig()
    choice = [e for e in examples if e.choices]
    free = [e for e in examples if not e.choices]
    predictions: list[dict] = []
    # in bf16, the weights are cast once for the task rather than on every forward and token
    with inference_autocast(base.model, config.bf16, next(base.model.parameters()).device):
        scores = choice_nll(base, choice, config) if choice else []
        answers = generate(base, free, config) if free else []
    for e, nll in zip(choice, scores):
        best = min(range(len(nll)), key=nll.__getitem__)
        predictions.append({"input": e.input, "prediction": e.choices[best],
                            "targets": list(e.targets), "correct": e.choices[best] in e.targets,
                            "nll": [round(x, 5) for x in nll]})
    for e, answer in zip(free, answers):
        hit = _normalise(answer) in {_normalise(t) for t in e.targets}
        predictions.append({"input": e.input, "prediction": answer,
                            "targets": list(e.targets), "correct": hit})
    kind = "multiple_choice" if not free else "generation" if not choice else "mixed"
    accuracy = sum(p["correct"] for p in predictions) / max(len(predictions), 1)
    return TaskResult(task, kind, accuracy, predictions)


def evaluate(
    base: BaseModel, tasks: dict[str, list[Example]], config: EvalConfig | None = None,
    desc: str = "eval",
) -> dict[str, TaskResult]:
    """Evaluate every task; returns {task: TaskResult}."""
    results = {}
    for name in tqdm(tasks, desc=desc, unit="task", dynamic_ncols=True):
        results[name] = evaluate_task(base, name, tasks[name], config)
    return results


def summary(results: dict[str, TaskResult]) -> dict:
    """JSON-ready per-task and average accuracy."""
    tasks = {n: {"accuracy": r.accuracy, "n": r.n, "kind": r.kind} for n, r in results.items()}
    average = sum(r.accuracy for r in results.values()) / max(len(results), 1)
    return {"tasks": tasks, "average": average}


def markdown_table(rows: dict[str, dict]) -> str:
    """A Markdown table: one row per method (its ``summary``), one column per task + average."""
    tasks = list(next(iter(rows.values()))["tasks"]) if rows else []
    lines = ["| method | " + " | ".join(tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for method, s in rows.items():
        cells = [f"{s['tasks'][t]['accuracy']:.3f}" if t in s["tasks"] else "" for t in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {s['average']:.3f} |")
    return "\n".join(lines)


def predictions_path(folder: Path | str, method: str) -> Path:
    """Where a run keeps ``method``'s per-example predictions: ``predictions-<method>.jsonl``
    (``:`` written ``_``, e.g. ``predictions-expert_<task>.jsonl`` for ``expert:<task>``)."""
    return Path(folder) / f"predictions-{method.replace(':', '_')}.jsonl"


def write_predictions(path: Path | str, results: dict[str, TaskResult]) -> None:
    """Write (or update: other tasks' lines are kept) per-example predictions as JSON lines,
    atomically."""
    path = Path(path)
    lines = []
    if path.exists():
        lines = [line for line in path.read_text().splitlines()
                 if json.loads(line)["task"] not in results]
    lines += [json.dumps({"task": name, "index": i, **p})
              for name, r in results.items() for i, p in enumerate(r.predictions)]
    write_text(path, "".join(line + "\n" for line in lines))


ORACLE = "oracle (best single expert per task; peeks at test labels)"


def oracle_summary(singles: dict[str, dict]) -> dict:
    """Per task, the best single expert's accuracy (and which expert it was)."""
    tasks = {}
    for task in next(iter(singles.values()))["tasks"]:
        method, best = max(((m, s["tasks"][task]) for m, s in singles.items()),
                           key=lambda pair: pair[1]["accuracy"])
        tasks[task] = {**best, "expert": method.removeprefix("single:")}
    return {"tasks": tasks, "average": sum(t["accuracy"] for t in tasks.values()) / len(tasks)}

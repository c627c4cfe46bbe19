"""The one training loop behind experts and gates: AdamW, linear warm-up then constant,
gradient clipping, gradient accumulation, validation keeping the best checkpoint, a stop on a
non-finite loss that keeps the last good parameters, and resumable checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phatgoose.data.encode import Encoded, collate, token_nll
from phatgoose.errors import DataError, PhatgooseError, TrainingDivergedError
from phatgoose.library.expert import (
    read_json,
    read_safetensors,
    write_dir_atomically,
    write_json,
    write_safetensors,
)
from phatgoose.logging import MetricLogger
from phatgoose.models import resolve_bf16


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the reference's, see docs/spec)."""

    steps: int = 1000  # optimizer steps
    lr: float = 5e-3  # AdamW learning rate
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06  # linear warm-up over this share of the steps, then constant
    max_grad_norm: float = 1.0  # gradient-norm clipping
    batch_size: int = 8  # sequences per forward pass
    grad_accum: int = 1  # forward passes per optimizer step (effective batch = product)
    eval_every: int = 100  # validate every N steps (and at the end) and keep the best
    max_input_tokens: int = 512
    max_target_tokens: int = 512
    # bf16 autocast; None: where it is faster (CUDA, CPUs with AMX or AVX512-BF16;
    # models.bf16_is_faster).
    # fp32 by default: with bf16 experts and gates, PHATGOOSE lost 0.07 on held-in tasks in
    # the full benchmark (docs/PERFORMANCE.md, target 7)
    bf16: bool | None = False
    length_window: int = 32  # batches drawn per window whose examples are sorted by length
    # before cutting, so a batch pads little (1: plain shuffled batches)
    seed: int = 42

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    best_step: int
    best_val_loss: float | None
    steps_done: int
    diverged_at: int | None  # step whose loss was NaN/inf, if any
    seconds: float  # training time, summed over the runs of a resumed training
    resumed_from: int = 0  # the checkpoint's step, when an interrupted training was resumed


def autocast(bf16: bool | None, device: torch.device):
    """bf16 autocast on ``device`` if ``bf16`` says so (None: where it is faster)."""
    if not resolve_bf16(bf16, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def inference_autocast(model: nn.Module, bf16: bool | None, device: torch.device
                       ) -> Iterator[None]:
    """``autocast`` for inference (under no_grad) that casts each weight to bf16 once for the
    whole region, not on every forward. Autocast keeps the bf16 copy of a leaf tensor that
    requires grad until its outermost region ends; so for the region the model's frozen fp32
    parameters are marked as requiring grad (nothing is differentiated under no_grad), then
    restored. The numbers are plain autocast's. The cost: a bf16 copy of every frozen fp32
    weight (half the fp32 model's size) lives as long as the region. Measured on the AMX CPU:
    a one-token forward of the SmolLM2-135M base model took 38 ms instead of 93 ms (fp32:
    34 ms). Compiled graphs do not use this cache."""
    if not resolve_bf16(bf16, device):
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    with torch.no_grad(), autocast(True, device):
        try:
            for p in frozen:
                p.requires_grad_(True)
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)


# torch's bf16 flash-attention backward on CPU is 2-4x slower than its fp32 one up to ~128
# tokens (and no faster at 256), while its bf16 forward is the faster one
# (benchmarks/attention_dtype.py): a CPU bf16 training step runs attention in fp32.
FP32_BACKWARD_SDPA = "phatgoose_sdpa_fp32_backward"


def sdpa_fp32_backward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention, computed in fp32 where it would run in bf16 or fp16 (under
    autocast, or on such inputs) and be backpropagated through, on the CPU. The output has the
    dtype the plain call would give."""
    if query.device.type == "cpu" and torch.is_grad_enabled():
        autocast_on = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast_on else query.dtype
        if dtype in (torch.bfloat16, torch.float16):
            def fp32(t):  # float masks and T5's position bias too
                return t.float() if torch.is_tensor(t) and t.is_floating_point() else t
            with torch.autocast("cpu", enabled=False):
                out, weights = sdpa_attention_forward(
                    module, fp32(query), fp32(key), fp32(value), fp32(attention_mask),
                    **{name: fp32(v) for name, v in kwargs.items()})
            return out.to(dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(FP32_BACKWARD_SDPA, sdpa_fp32_backward)
AttentionMaskInterface.register(FP32_BACKWARD_SDPA, sdpa_mask)


@contextlib.contextmanager
def training_attention(model: nn.Module, bf16: bool, device: torch.device):
    """Within: a model using SDPA attention runs ``sdpa_fp32_backward`` when training in bf16
    on the CPU (see ``FP32_BACKWARD_SDPA``); any other model or setting is left as it is."""
    config = getattr(model, "config", None)
    if not (bf16 and device.type == "cpu" and getattr(config, "_attn_implementation", None)
            == "sdpa" and hasattr(model, "set_attn_implementation")):
        yield
        return
    model.set_attn_implementation(FP32_BACKWARD_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def batches(
    data: list[Encoded], size: int, seed: int, window: int = 1
) -> Iterator[list[Encoded]]:
    """Endless shuffled batches, reshuffled every epoch, deterministic from the seed.

    With ``window`` > 1, each run of ``window * size`` shuffled examples is sorted by length,
    cut into batches and the batches shuffled: every example is still seen once per epoch, but
    a batch holds examples of similar length and wastes little compute on padding."""
    rng = random.Random(seed)
    order: list[int] = []
    ready: list[list[int]] = []
    while True:
        if not ready:
            while len(order) < size * window:
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            chunk, order = order[: size * window], order[size * window :]
            if window > 1:
                chunk.sort(key=lambda i: len(data[i].input_ids))
            ready = [chunk[i : i + size] for i in range(0, len(chunk), size)]
            rng.shuffle(ready)
        yield [data[i] for i in ready.pop()]


@torch.no_grad()
def validation_loss(
    model: nn.Module, data: list[Encoded], pad_id: int, seq2seq: bool, config: TrainConfig
) -> float:
    """Token-weighted mean NLL of the targets."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    data = sorted(data, key=lambda e: len(e.input_ids))  # similar lengths pad little
    for i in range(0, len(data), config.batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i : i + config.batch_size], pad_id,
                                                      seq2seq).items()}
        with autocast(config.bf16, device):
            nll, mask = token_nll(model, batch, seq2seq)
        total, count = total + nll.sum().item(), count + mask.sum().item()
    return total / max(count, 1)


def _run_key(
    params: dict[str, nn.Parameter], data: list[Encoded], val_data: list[Encoded],
    config: TrainConfig, identity: str,
) -> str:
    """What a checkpoint must match to be resumed: the settings, the trained tensors' names
    and shapes, the training and validation data, and the caller's ``identity`` of what is
    frozen (the base model, and for a gate its expert)."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(identity.encode())
    for name, p in params.items():
        digest.update(f"{name}{tuple(p.shape)}".encode())
    for e in [*data, None, *val_data]:
        digest.update(repr(e and (e.input_ids, e.labels)).encode())
    return digest.hexdigest()[:16]


def _save_checkpoint(
    path: Path, key: str, step: int, params: dict[str, nn.Parameter],
    best: dict[str, torch.Tensor], best_loss: float | None, best_step: int,
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
    seconds: float,
) -> None:
    """Parameters, best parameters, AdamW moments and the RNG in safetensors; the step,
    optimiser and schedule settings in JSON. Written to a temporary directory, then renamed."""
    names = list(params)
    state = optimizer.state_dict()
    tensors = {f"param.{n}": p for n, p in params.items()}
    tensors |= {f"best.{n}": t for n, t in best.items()}
    for index, values in state["state"].items():
        tensors |= {f"optim.{names[index]}.{k}": v for k, v in values.items()}
    tensors["rng"] = torch.get_rng_state()
    device = next(iter(params.values())).device
    if device.type == "cuda":  # dropout on a GPU draws from its own generator
        tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
    meta = {"key": key, "step": step, "best_loss": best_loss, "best_step": best_step,
            "seconds": seconds, "param_groups": state["param_groups"],
            "schedule": schedule.state_dict()}

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", meta)

    write_dir_atomically(path, fill)


def _load_checkpoint(
    path: Path, key: str, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, torch.Tensor], float | None, int, float] | None:
    """Restore a checkpoint saved by the same run (same key) into ``params``, ``optimizer``
    and ``schedule``; returns (step, best, best_loss, best_step, seconds), or None when there
    is no checkpoint or it belongs to other settings or data."""
    try:
        meta = read_json(path / "state.json")
        tensors = read_safetensors(path / "state.safetensors")
    except PhatgooseError:
        return None
    names = {n: i for i, n in enumerate(params)}
    needed = {"rng", *(f"{kind}.{n}" for n in names for kind in ("param", "best"))}
    fields = {"step", "best_loss", "best_step", "seconds", "param_groups", "schedule"}
    if meta.get("key") != key or not needed <= tensors.keys() or not fields <= meta.keys():
        return None
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim."):
            param, _, field = name[len("optim."):].rpartition(".")
            if param not in names:
                return None
            moments.setdefault(names[param], {})[field] = tensor
    try:  # the optimiser and schedule first: a bad checkpoint leaves the parameters untouched
        optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
        schedule.load_state_dict(meta["schedule"])
    except (KeyError, ValueError, TypeError):
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    torch.set_rng_state(tensors["rng"])
    if "cuda_rng" in tensors and next(iter(params.values())).is_cuda:
        torch.cuda.set_rng_state(tensors["cuda_rng"], next(iter(params.values())).device)
    best = {n: tensors[f"best.{n}"] for n in names}
    return meta["step"], best, meta["best_loss"], meta["best_step"], meta["seconds"]


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    train_data: list[Encoded],
    val_data: list[Encoded],
    pad_id: int,
    seq2seq: bool,
    config: TrainConfig,
    logger: MetricLogger | None = None,
    desc: str = "train",
    checkpoint: Path | None = None,
    checkpoint_every: int = 25,
    identity: str = "",
) -> TrainResult:
    """Train ``params`` (everything else must be frozen) and leave the best ones in place.

    The best parameters are those with the lowest validation loss among the evaluations (every
    ``eval_every`` steps and at the end); with no validation data, the last ones. On a NaN or
    infinite loss training stops, the last good parameters are restored, and
    ``TrainResult.diverged_at`` says where.

    With ``checkpoint`` (a directory), the whole state is saved there every
    ``checkpoint_every`` steps, and a later call with the same settings, parameters, data and
    ``identity`` (of the frozen model) resumes from it and ends where an uninterrupted run
    would have. The caller removes the directory once it has saved the result."""
    if not train_data:
        raise DataError("no training examples: the task's train split is empty")
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        params.values(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, math.ceil(config.warmup_fraction * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    snapshot = {k: p.detach().clone() for k, p in params.items()}  # last good parameters
    best, best_loss, best_step = dict(snapshot), None, 0
    diverged_at, started, earlier_seconds, start = None, time.time(), 0.0, 0
    key = _run_key(params, train_data, val_data, config, identity) if checkpoint else ""
    stream = batches(train_data, config.batch_size, config.seed, config.length_window)
    if checkpoint and (restored := _load_checkpoint(checkpoint, key, params, optimizer,
                                                    schedule)):
        start, best, best_loss, best_step, earlier_seconds = restored
        snapshot = {k: p.detach().clone() for k, p in params.items()}
        for _ in range(start * config.grad_accum):  # the batches the first run consumed
            next(stream)
    if logger and start:
        logger.drop_after(start)  # a resumed run logs the steps after its checkpoint again
    bf16 = resolve_bf16(config.bf16, device)
    with training_attention(model, bf16, device):
        model.train()
        bar = tqdm(range(start + 1, config.steps + 1), desc=desc, unit="step", dynamic_ncols=True,
                   initial=start, total=config.steps)
        step = start
        for step in bar:
            total = 0.0
            for _ in range(config.grad_accum):
                batch = {k: v.to(device) for k, v in collate(next(stream), pad_id, seq2seq).items()}
                with autocast(bf16, device):
                    nll, mask = token_nll(model, batch, seq2seq)
                    loss = nll.sum() / mask.sum().clamp(min=1) / config.grad_accum
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                diverged_at = step
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm).item()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if not all(p.isfinite().all() for p in params.values()):
                diverged_at = step
                break
            snapshot = {k: p.detach().clone() for k, p in params.items()}
            bar.set_postfix(loss=f"{total:.4f}")
            if logger:
                logger.log(step=step, loss=total, lr=schedule.get_last_lr()[0], grad_norm=grad_norm)
            if val_data and (step % config.eval_every == 0 or step == config.steps):
                model.eval()
                val = validation_loss(model, val_data, pad_id, seq2seq, config)
                model.train()
                if logger:
                    logger.log(step=step, val_loss=val)
                if best_loss is None or val < best_loss:
                    best, best_loss, best_step = snapshot, val, step
            if checkpoint and step % checkpoint_every == 0 and step < config.steps:
                _save_checkpoint(checkpoint, key, step, params, best, best_loss, best_step,
                                 optimizer, schedule, earlier_seconds + time.time() - started)
        bar.close()
    model.eval()
    if diverged_at is not None or not val_data:
        best, best_step, best_loss = snapshot, step - (diverged_at is not None), None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best[k])
    optimizer.zero_grad(set_to_none=True)
    return TrainResult(best_step, best_loss, step, diverged_at,
                       earlier_seconds + time.time() - started, start)


def raise_if_diverged(result: TrainResult, where: str) -> None:
    if result.diverged_at is not None:
        raise TrainingDivergedError(
            f"loss became NaN/inf at step {result.diverged_at}; kept the last good parameters "
            f"(step {result.best_step}) in {where}: lower the learning rate or check the data"
        )

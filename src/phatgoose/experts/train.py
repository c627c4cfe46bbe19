"""Training one LoRA expert per task (with PEFT) and its PHATGOOSE gate (post hoc)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from phatgoose.data.encode import Encoded, encode
from phatgoose.data.tasks import Example
from phatgoose.errors import LibraryError, PhatgooseError
from phatgoose.experts.loop import TrainConfig, raise_if_diverged, train
from phatgoose.library.expert import (
    ADAPTER_WEIGHTS,
    EXPERT_META,
    GATES,
    load_lora,
    load_metadata,
    write_dir_atomically,
    write_json,
    write_safetensors,
)
from phatgoose.logging import MetricLogger
from phatgoose.models import BaseModel, resolve_bf16, resolve_target_modules
from phatgoose.routing.attach import check_fit, set_module, unroute
from phatgoose.routing.container import RoutedLinear
from phatgoose.routing.routers import SigmoidGate


@dataclass
class ExpertConfig(TrainConfig):
    """A LoRA expert: the reference's recipe by default (rank 16, delta W = B A / r, A ~
    N(0, 0.01^2), B = 0, no dropout, every linear of attention and MLP)."""

    rank: int = 16
    alpha: float = 1.0  # PEFT's lora_alpha: scaling = alpha / rank
    targets: str | list[str] = "all-linear"  # or module-name suffixes, e.g. [q_proj, v_proj]
    init: str = "reference"  # "reference": A ~ N(0, 0.01^2); "peft": PEFT's Kaiming-uniform A

    def __post_init__(self) -> None:
        if self.init not in ("reference", "peft"):
            raise PhatgooseError(f"init must be 'reference' or 'peft', not {self.init!r}")


@dataclass
class GateConfig(TrainConfig):
    """A PHATGOOSE gate: same optimiser settings as the expert, 100 steps."""

    steps: int = 100


def encode_examples(base: BaseModel, examples: list[Example], config: TrainConfig) -> list[Encoded]:
    return [
        encode(base.tokenizer, e.prompt, e.continuation, base.is_seq2seq,
               config.max_input_tokens, config.max_target_tokens)
        for e in examples
    ]


def train_expert(
    base: BaseModel,
    task: str,
    train_examples: list[Example],
    val_examples: list[Example],
    out: Path | str,
    config: ExpertConfig | None = None,
    log_path: Path | str | None = None,
    source: str | None = None,
    tensorboard_dir: Path | str | None = None,
    split: dict | None = None,
    checkpoint_every: int = 25,
) -> Path:
    """Train a LoRA expert on a frozen base model and save it as a PEFT adapter directory
    plus ``expert.json``. The base model is left unchanged. ``source`` (where the task was
    loaded from) and ``split`` (the split settings) are recorded so that later steps (the gate,
    average activations) can find the same training data.

    Training state is checkpointed beside ``out`` (``.NAME.checkpoint``) every
    ``checkpoint_every`` steps: an interrupted call, repeated with the same settings and data,
    resumes from it."""
    config = config or ExpertConfig()
    model = base.model
    # the autocast setting made definite, so that the metadata and checkpoint say what ran
    config = replace(config, bf16=resolve_bf16(config.bf16, model.device))
    out = Path(out)
    targets = resolve_target_modules(model, config.targets)
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=targets,
        task_type="SEQ_2_SEQ_LM" if base.is_seq2seq else "CAUSAL_LM",
    )
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config)
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    if config.init == "reference":
        with torch.no_grad():
            for name, p in params.items():
                if "lora_A" in name:
                    p.normal_(0.0, 0.01)
    for p in params.values():
        p.requires_grad_(True)
    logger = MetricLogger(log_path, tensorboard_dir)
    checkpoint = out.parent / f".{out.name}.checkpoint"
    try:
        result = train(  # LoRA layers are injected in place: train through the HF model
            model, params, encode_examples(base, train_examples, config),
            encode_examples(base, val_examples, config), base.tokenizer.pad_token_id,
            base.is_seq2seq, config, logger, desc=f"expert {task}",
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, identity=base.fingerprint,
        )
        metadata = {
            "task": task,
            "task_source": source or task,
            "split": split,
            "base_model": base.name,
            "base_fingerprint": base.fingerprint,
            "kind": "lora",
            "config": asdict(config),
            "metrics": {
                "best_step": result.best_step,
                "best_val_loss": result.best_val_loss,
                "steps_done": result.steps_done,
                "diverged_at": result.diverged_at,
                "train_seconds": round(result.seconds, 1),
                "device": base.device_name,
                "resumed_from_step": result.resumed_from,
                "train_examples": len(train_examples),
                "val_examples": len(val_examples),
            },
        }

        def fill(tmp: Path) -> None:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / EXPERT_META, metadata)

        write_dir_atomically(out, fill)
        shutil.rmtree(checkpoint, ignore_errors=True)  # only once the expert is saved
    finally:
        logger.close()
        peft_model.unload()  # removes the LoRA layers, restoring the base modules
    raise_if_diverged(result, str(out))
    return out


def train_gate(
    base: BaseModel,
    expert_dir: Path | str,
    train_examples: list[Example],
    val_examples: list[Example],
    config: GateConfig | None = None,
    log_path: Path | str | None = None,
    tensorboard_dir: Path | str | None = None,
    checkpoint_every: int = 25,
) -> Path:
    """Train the expert's gate: y = W x + sigmoid(v . x) * s B A x at every adapted module,
    v initialised to zeros; only the v's train (base and LoRA frozen). Saves
    ``gates.safetensors`` beside the adapter and the gate metrics into ``expert.json``.
    Checkpointed and resumable like ``train_expert``."""
    config = config or GateConfig()
    config = replace(config, bf16=resolve_bf16(config.bf16, base.model.device))  # as above
    expert_dir = Path(expert_dir)
    metadata = load_metadata(expert_dir)
    if metadata.get("base_fingerprint") != base.fingerprint:
        raise LibraryError(
            f"{expert_dir} was trained on base model {metadata.get('base_model')!r} "
            f"({metadata.get('base_fingerprint')}), not on {base.name!r} ({base.fingerprint})"
        )
    lora = load_lora(expert_dir)
    model = base.model
    check_fit(model, {m: (w.A.shape[1], w.B.shape[0]) for m, w in lora.items()})
    gates: dict[str, SigmoidGate] = {}
    for module, weights in lora.items():
        layer = model.get_submodule(module)
        gates[module] = SigmoidGate(weights.A.shape[1])
        routed = RoutedLinear.from_experts(layer, [weights], gates[module])
        set_module(model, module, routed.to(layer.weight.device))  # the LoRA loads on the CPU
    params = {m: g.vectors for m, g in gates.items()}
    logger = MetricLogger(log_path, tensorboard_dir)
    checkpoint = expert_dir.parent / f".{expert_dir.name}.gate-checkpoint"
    # a retrained expert or another base model must not resume this gate's checkpoint
    identity = base.fingerprint + hashlib.sha256(
        (expert_dir / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    try:
        result = train(
            model, params, encode_examples(base, train_examples, config),
            encode_examples(base, val_examples, config), base.tokenizer.pad_token_id,
            base.is_seq2seq, config, logger, desc=f"gate {metadata.get('task', expert_dir.name)}",
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, identity=identity,
        )
        write_safetensors(expert_dir / GATES, {m: v[0] for m, v in params.items()})
        metadata["gate"] = {
            "config": asdict(config),
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "diverged_at": result.diverged_at,
            "train_seconds": round(result.seconds, 1),
            "device": base.device_name,
            "resumed_from_step": result.resumed_from,
        }
        write_json(expert_dir / EXPERT_META, metadata)
        shutil.rmtree(checkpoint, ignore_errors=True)  # only once the gate is saved
    finally:
        logger.close()
        unroute(model)
    raise_if_diverged(result, str(expert_dir / GATES))
    return expert_dir / GATES

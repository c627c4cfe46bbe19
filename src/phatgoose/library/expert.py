"""One expert on disk: a standard PEFT LoRA adapter directory plus phatgoose's files.

    <expert>/adapter_config.json        PEFT's config (PeftModel.from_pretrained loads the dir)
    <expert>/adapter_model.safetensors  A as (r, d_in), B as (d_out, r)
    <expert>/expert.json                task, base model id + fingerprint, training config, metrics
    <expert>/gates.safetensors          one PHATGOOSE gate vector (d_in,) per adapted module
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from phatgoose.errors import LibraryError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_META = "expert.json"
GATES = "gates.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """One expert at one module: delta W = scaling * B A, with A (r, d_in) and B (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def put_expert(A: torch.Tensor, B: torch.Tensor, e: int, expert: LoraWeights) -> None:
    """Write ``expert`` into slot e of the stacks A (E, r, d_in) and B (E, r, d_out): A as is,
    B transposed and pre-scaled (s_e B_e^T); a lower rank fills the first rows and leaves the
    rest as they are (zeros in a fresh stack, which changes nothing)."""
    rank = expert.A.shape[0]
    A[e, :rank] = expert.A
    B[e, :rank] = expert.B.T.float() * expert.scaling


def stack_experts(
    experts: list[LoraWeights], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """E experts at one module as two tensors: A (E, r, d_in) and the pre-scaled, transposed
    s_e B_e^T (E, r, d_out), so that s_e B_e A_e x = B[e]^T (A[e] x). Lower ranks are padded."""
    rank = max(e.A.shape[0] for e in experts)
    (d_out, _), d_in = experts[0].B.shape, experts[0].A.shape[1]
    A = torch.zeros(len(experts), rank, d_in, dtype=dtype)
    B = torch.zeros(len(experts), rank, d_out, dtype=dtype)
    for e, expert in enumerate(experts):
        put_expert(A, B, e, expert)
    return A, B


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise LibraryError(f"{path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LibraryError(f"{path} is not valid JSON ({err}); rewrite or remove it") from err


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a temporary file beside it, then a rename, so a reader
    never sees it half-written."""
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_atomically(path: Path, fill: Callable[[Path], object]) -> None:
    """Create ``path`` by ``fill``-ing a temporary file beside it (``.<name>.<random>.tmp``,
    which no ``*.<suffix>`` pattern matches), then renaming it; the temporary file is removed
    if ``fill`` fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(Path(tmp))
        _plain_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _plain_mode(path: Path, mode: int) -> None:
    """Give a temporary file (created 0600) or folder (0700) the permissions a plain create
    would have given it: ``mode`` less the process's umask."""
    os.chmod(path, mode & ~_umask())


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where the kernel reports it (Linux):
    reading it with ``os.umask`` means setting it to 0 and back, and a file another thread
    creates in between gets mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)  # elsewhere the only way: set it and restore it
    os.umask(umask)
    return umask


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (``write_text``)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_dir_atomically(out: Path, fill: Callable[[Path], None]) -> None:
    """Create ``out`` by filling a temporary sibling directory, then renaming it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        _plain_mode(tmp, 0o777)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file, in name order (the reader's own order varies from
    call to call); anything else (e.g. a pickle) is refused."""
    path = Path(path)
    if not path.exists():
        raise LibraryError(f"{path} is missing")
    try:  # reading the bytes at once is 3x faster than load_file's per-tensor reads
        return dict(sorted(load(path.read_bytes()).items()))
    except (SafetensorError, OSError, ValueError) as err:
        raise LibraryError(
            f"{path} is not a valid safetensors file ({err}); phatgoose never loads pickles: "
            "re-save the weights with safetensors"
        ) from err


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None
) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_lora(expert_dir: Path) -> dict[str, LoraWeights]:
    """Read a PEFT LoRA adapter directory into {base module name: LoraWeights}."""
    expert_dir = Path(expert_dir)
    config = read_json(expert_dir / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise LibraryError(f"{expert_dir} holds a {config['peft_type']} adapter, not a LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LibraryError(f"{expert_dir}: per-module rank_pattern/alpha_pattern is not supported")
    if not (expert_dir / ADAPTER_WEIGHTS).exists() and (expert_dir / "adapter_model.bin").exists():
        raise LibraryError(
            f"{expert_dir} has adapter_model.bin (a pickle), which phatgoose does not load: "
            "re-save it with PEFT's save_pretrained(safe_serialization=True)"
        )
    tensors = read_safetensors(expert_dir / ADAPTER_WEIGHTS)
    alpha, rank = float(config.get("lora_alpha", 8)), int(config.get("r", 8))
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    modules: dict[str, LoraWeights] = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(_PEFT_PREFIX)
        B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise LibraryError(f"{expert_dir}: LoRA factors of {name} are missing or misshapen")
        modules[name] = LoraWeights(A, B, scaling)
    if not modules:
        raise LibraryError(f"{expert_dir / ADAPTER_WEIGHTS} holds no LoRA weights")
    return modules


def load_gates(expert_dir: Path) -> dict[str, torch.Tensor]:
    """Read an expert's gate vectors {module name: (d_in,)}."""
    path = Path(expert_dir) / GATES
    if not path.exists():
        raise LibraryError(
            f"{path} is missing: train the gate first (`phatgoose train-gate {expert_dir}`)"
        )
    return read_safetensors(path)


def load_metadata(expert_dir: Path) -> dict[str, Any]:
    return read_json(Path(expert_dir) / EXPERT_META)

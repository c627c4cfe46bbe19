"""The few-token routed delta on CPU as one C function (``native_routing.c``), built at first use
by the system's C compiler for this machine and cached on disk, then called through ctypes.

Decoding routes one token per sequence through every adapted module; in torch that is about ten
small ops per module (router matmul, LayerNorm statistics, top-k, softmax, two gathers, two
batched matmuls), each costing microseconds of dispatch. In C it is one call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from phatgoose.paths import cache_dir

SOURCE = Path(__file__).with_name("native_routing.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
_library: ctypes.CDLL | None = None


class NativeBuildError(RuntimeError):
    """The C routing kernel could not be compiled or loaded here."""


def _machine_key() -> str:
    """What the compiled code depends on besides its source: the CPU's instruction sets
    (-march=native) and the compiler."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{os.uname().machine} {flags} {os.environ.get('CC', 'cc')}"


def library() -> ctypes.CDLL:
    """The compiled kernel, built into the cache on first use (written to a temporary file, then
    renamed); raises ``NativeBuildError`` if there is no working C compiler."""
    global _library
    if _library is not None:
        return _library
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + _machine_key().encode())
    path = cache_dir() / "kernels" / f"native_routing-{digest.hexdigest()[:16]}.so"
    if not path.exists():
        compiler = os.environ.get("CC", "cc")
        if shutil.which(compiler) is None:
            raise NativeBuildError(f"no C compiler ({compiler!r}) on PATH")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise NativeBuildError(f"{compiler} failed: {result.stderr.strip()[:300]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeBuildError(f"cannot load {path}: {err}") from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.routed_delta_f32.argtypes = [i64] * 6 + [ptr] * 5 + [
        ctypes.c_int, ctypes.c_double, ctypes.c_double]
    lib.routed_delta_f32.restype = ctypes.c_int
    _library = lib
    return lib


class Prepared(NamedTuple):
    """A routed module's fixed arguments to the kernel (``prepare``): its tensors (kept alive:
    the kernel reads them through their addresses) and the scalars after x and out."""

    tensors: tuple[Tensor, Tensor, Tensor]
    d_in: int
    d_out: int
    sizes: tuple[int, int, int]  # experts, rank, k
    tail: tuple[int, int, int, int, float, float]  # addresses, arrow, eps, temperature


def prepare(vectors: Tensor, A: Tensor, B: Tensor, k: int, arrow: bool, eps: float,
            temperature: float) -> Prepared:
    """Check and pack the fixed arguments of ``add_routed_delta_``: the E routing vectors
    (E, d_in), scored as ``PhatgooseRouter`` does (standardised dot product, LayerNorm's eps)
    or, if ``arrow``, ``ArrowRouter`` (|x . p| / temperature); the stacks A (E, r, d_in) and
    B (E, r, d_out); the k experts kept per token. All fp32, contiguous, on CPU."""
    for t in (vectors, A, B):
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("the native routing kernel takes contiguous fp32 CPU tensors")
    experts, rank, d_out = B.shape
    d_in = vectors.shape[1]
    if vectors.shape[0] != experts or A.shape != (experts, rank, d_in):
        raise ValueError(f"mismatched shapes: vectors {tuple(vectors.shape)}, A "
                         f"{tuple(A.shape)}, B {tuple(B.shape)}")
    return Prepared((vectors, A, B), d_in, d_out, (experts, rank, min(k, experts)),
                    (vectors.data_ptr(), A.data_ptr(), B.data_ptr(), int(arrow), eps,
                     temperature))


def add_routed_delta_(x: Tensor, out: Tensor, prepared: Prepared) -> None:
    """out += the routed delta of each row of x (n, d_in): its k best experts (``prepare``),
    weighted by the softmax of their k scores: sum_j w_j (A_e x) B_e. x and out (n, d_out) are
    fp32, contiguous, on CPU; out is written in place."""
    n, d_in = x.shape
    if not (x.dtype == out.dtype == torch.float32 and x.is_cpu and out.is_cpu
            and x.is_contiguous() and out.is_contiguous()):
        raise ValueError("the native routing kernel takes contiguous fp32 CPU tensors")
    if d_in != prepared.d_in or out.shape != (n, prepared.d_out):
        raise ValueError(f"x {tuple(x.shape)} and out {tuple(out.shape)} do not fit a "
                         f"{prepared.d_in} -> {prepared.d_out} layer")
    if library().routed_delta_f32(n, d_in, prepared.d_out, *prepared.sizes, x.data_ptr(),
                                  out.data_ptr(), *prepared.tail):
        raise MemoryError("the native routing kernel could not allocate its scratch")

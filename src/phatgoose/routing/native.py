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
import shlex
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
# OpenMP where the compiler has it: the kernel then links libgomp.so.1, which resolves to the
# copy torch has already loaded, so it shares torch's threads (and their count)
OPENMP = "-fopenmp"
_library: ctypes.CDLL | None = None


class NativeBuildError(RuntimeError):
    """The C routing kernel could not be compiled or loaded here."""


def _build(compiler: list[str], path: Path) -> None:
    """Compile the kernel into ``path``, through a temporary file in its folder, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        for flags in ((*FLAGS, OPENMP), FLAGS):  # without OpenMP: one thread
            result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", tmp, "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise NativeBuildError(f"{' '.join(compiler)} failed: "
                                   f"{result.stderr.strip()[:300]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler() -> list[str]:
    """The C compiler's command: ``$CC`` (which may carry arguments, "ccache gcc" say), else
    ``cc``."""
    return shlex.split(os.environ.get("CC", "")) or ["cc"]


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
    return f"{os.uname().machine} {flags} {' '.join(_compiler())}"


def library() -> ctypes.CDLL:
    """The compiled kernel, built into the cache on first use (written to a temporary file, then
    renamed); raises ``NativeBuildError`` if there is no working C compiler."""
    global _library
    if _library is not None:
        return _library
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((*FLAGS, OPENMP)).encode()
                            + _machine_key().encode())
    path = cache_dir() / "kernels" / f"native_routing-{digest.hexdigest()[:16]}.so"
    if not path.exists():
        compiler = _compiler()
        if shutil.which(compiler[0]) is None:
            raise NativeBuildError(f"no C compiler ({' '.join(compiler)!r}) on PATH")
        try:
            _build(compiler, path)
        except OSError as err:  # an unwritable cache, say
            raise NativeBuildError(f"cannot build {path}: {err}") from err
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeBuildError(f"cannot load {path}: {err}") from err
    lib.routed_delta.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                 ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(Params)]
    lib.routed_delta.restype = ctypes.c_int
    lib.chosen_delta.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(Params)]
    lib.chosen_delta.restype = ctypes.c_int
    _library = lib
    return lib


class Params(ctypes.Structure):
    """A routed module's fixed arguments, as ``native_routing.c`` declares them."""

    _fields_ = [("d_in", ctypes.c_int64), ("d_out", ctypes.c_int64),
                ("experts", ctypes.c_int64), ("rank", ctypes.c_int64), ("k", ctypes.c_int64),
                ("vectors", ctypes.c_void_p), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p),
                ("vectors_bf16", ctypes.c_int32), ("stacks_bf16", ctypes.c_int32),
                ("arrow", ctypes.c_int32), ("unused", ctypes.c_int32),
                ("eps", ctypes.c_double), ("temperature", ctypes.c_double)]


# the dtypes the kernel reads and writes; it computes in fp32
DTYPES = (torch.float32, torch.bfloat16)


class Prepared(NamedTuple):
    """A routed module's fixed arguments to the kernel (``prepare``): its tensors (kept alive:
    the kernel reads them through their addresses, ``addresses``) and the packed ``params``."""

    tensors: tuple[Tensor, Tensor, Tensor]
    addresses: tuple[int, int, int]
    d_in: int
    d_out: int
    params: ctypes._Pointer


def _check(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in DTYPES or not t.is_cpu or not t.is_contiguous():
            raise ValueError("the native routing kernel takes contiguous fp32 or bf16 CPU "
                             f"tensors, got a {'' if t.is_contiguous() else 'non-contiguous '}"
                             f"{t.dtype} tensor on {t.device}")


def prepare(vectors: Tensor, A: Tensor, B: Tensor, k: int, arrow: bool, eps: float,
            temperature: float) -> Prepared:
    """Check and pack the fixed arguments of ``add_routed_delta_``: the E routing vectors
    (E, d_in), scored as ``PhatgooseRouter`` does (standardised dot product, LayerNorm's eps)
    or, if ``arrow``, ``ArrowRouter`` (|x . p| / temperature); the stacks A (E, r, d_in) and
    B (E, r, d_out), of one dtype; the k experts kept per token. Contiguous, on CPU, each fp32
    or bf16."""
    _check(vectors, A, B)
    experts, rank, d_out = B.shape
    d_in = vectors.shape[1]
    if vectors.shape[0] != experts or A.shape != (experts, rank, d_in) or A.dtype != B.dtype:
        raise ValueError(f"mismatched stacks: vectors {tuple(vectors.shape)}, A "
                         f"{tuple(A.shape)} {A.dtype}, B {tuple(B.shape)} {B.dtype}")
    bf16 = torch.bfloat16
    params = Params(d_in, d_out, experts, rank, min(k, experts), vectors.data_ptr(),
                    A.data_ptr(), B.data_ptr(), vectors.dtype == bf16, A.dtype == bf16,
                    int(arrow), 0, eps, temperature)
    return Prepared((vectors, A, B), (vectors.data_ptr(), A.data_ptr(), B.data_ptr()), d_in,
                    d_out, ctypes.pointer(params))


def add_routed_delta_(x: Tensor, out: Tensor, prepared: Prepared) -> None:
    """out += the routed delta of each row of x (n, d_in): its k best experts (``prepare``),
    weighted by the softmax of their k scores: sum_j w_j (A_e x) B_e, computed in fp32 and
    added once. x and out (n, d_out) are contiguous CPU tensors, each fp32 or bf16; out is
    written in place."""
    _check(x, out)
    n, d_in = x.shape
    if d_in != prepared.d_in or out.shape != (n, prepared.d_out):
        raise ValueError(f"x {tuple(x.shape)} and out {tuple(out.shape)} do not fit a "
                         f"{prepared.d_in} -> {prepared.d_out} layer")
    bf16 = torch.bfloat16
    if library().routed_delta(n, x.data_ptr(), x.dtype == bf16, out.data_ptr(),
                              out.dtype == bf16, prepared.params):
        raise MemoryError("the native routing kernel could not allocate its scratch")


def add_chosen_delta_(x: Tensor, out: Tensor, experts: Tensor, weights: Tensor,
                      prepared: Prepared) -> None:
    """out += sum_j w_tj (A_e x_t) B_e over each row's chosen experts e = experts[t, j] (int64,
    (n, k), k as ``prepare`` was given it) and their weights (n, k): the delta of many tokens
    (prefill) once the router has chosen, the (token, slot) pairs grouped by expert in C. x
    (n, d_in), out (n, d_out), weights and the prepared stacks are contiguous fp32 CPU
    tensors; out is written in place."""
    params = prepared.params.contents
    n, d_in = x.shape
    for t in (x, out, weights, *prepared.tensors[1:]):
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("add_chosen_delta_ takes contiguous fp32 CPU tensors, got a "
                             f"{t.dtype} tensor on {t.device}")
    if d_in != prepared.d_in or out.shape != (n, prepared.d_out) or (
            experts.shape != (n, params.k) or weights.shape != (n, params.k)):
        raise ValueError(f"x {tuple(x.shape)}, out {tuple(out.shape)}, experts "
                         f"{tuple(experts.shape)} and weights {tuple(weights.shape)} do not fit "
                         f"a {prepared.d_in} -> {prepared.d_out} layer with k = {params.k}")
    if experts.dtype != torch.int64 or not experts.is_cpu or not experts.is_contiguous():
        raise ValueError("experts must be a contiguous int64 CPU tensor, got "
                         f"{experts.dtype} on {experts.device}")
    if n and (experts.min() < 0 or experts.max() >= params.experts):
        raise ValueError(f"experts holds an index outside the library's {params.experts}")
    if library().chosen_delta(n, x.data_ptr(), out.data_ptr(), experts.data_ptr(),
                              weights.data_ptr(), prepared.params):
        raise MemoryError("the native routing kernel could not allocate its scratch")

"""An expert library: a directory of experts with a JSON manifest.

    <library>/manifest.json        base model id and fingerprint, and the experts in order
    <library>/experts/<name>/      one expert directory each (see ``phatgoose.library.expert``)
    <library>/stacks/<key>.safetensors   a cache: all experts stacked per module (``stacked``)

Adding an expert copies its directory in and rewrites the manifest; no other expert is touched
or retrained (PHATGOOSE's post-hoc property)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from phatgoose.errors import LibraryError
from phatgoose.library.expert import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_META,
    GATES,
    LoraWeights,
    load_gates,
    load_lora,
    load_metadata,
    put_expert,
    read_json,
    write_dir_atomically,
    write_json,
    write_safetensors,
)

MANIFEST = "manifest.json"
STACKS = "stacks"
FORMAT = "phatgoose-library"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def expert_name(task: str) -> str:
    """A directory-safe expert name from a task name ("color/rgb" -> "color.rgb")."""
    return re.sub(r"[^A-Za-z0-9._-]+", ".", task).strip(".")


def default_expert_name(expert_dir: Path | str) -> str:
    """The name an expert gets in a library unless given one: from its task, else its folder."""
    return expert_name(load_metadata(Path(expert_dir)).get("task") or Path(expert_dir).name)


class ExpertLibrary:
    """Read and extend a library directory. Tensors are loaded lazily, per expert."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            raise LibraryError(
                f"{self.root} is not an expert library (no {MANIFEST}): "
                "create one with `phatgoose library build`"
            )
        self.manifest = read_json(self.root / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise LibraryError(f"{self.root / MANIFEST} is not a phatgoose library manifest")

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, base_model: str, base_fingerprint: str) -> ExpertLibrary:
        root = Path(root)
        if (root / MANIFEST).exists():
            raise LibraryError(f"{root} already holds a library: use `phatgoose library add`")
        (root / "experts").mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "version": 1,
            "base_model": base_model,
            "base_fingerprint": base_fingerprint,
            "experts": [],
        }
        write_json(root / MANIFEST, manifest)
        return cls(root)

    @classmethod
    def build(cls, root: Path | str, expert_dirs: list[Path]) -> ExpertLibrary:
        """Create a library from trained expert directories (each with its gate). Built in a
        temporary folder and renamed at the end: a bad expert leaves no library behind."""
        root = Path(root)
        if not expert_dirs:
            raise LibraryError("no experts given: pass the directories of trained experts")
        if root.exists() and any(root.iterdir()):
            raise LibraryError(f"{root} exists and is not empty: choose a new library folder")
        meta = load_metadata(Path(expert_dirs[0]))

        def fill(tmp: Path) -> None:
            library = cls.create(tmp, meta["base_model"], meta["base_fingerprint"])
            for expert_dir in expert_dirs:
                library.add(expert_dir)

        write_dir_atomically(root, fill)  # root is absent or empty (checked above)
        return cls(root)

    def add(self, expert_dir: Path | str, name: str | None = None) -> str:
        """Copy a trained expert (adapter + gate + metadata) into the library."""
        expert_dir = Path(expert_dir)
        meta = load_metadata(expert_dir)
        name = name or default_expert_name(expert_dir)
        if not _NAME.match(name):
            raise LibraryError(f"invalid expert name {name!r}: use letters, digits, '.', '_', '-'")
        if name in self.names:
            raise LibraryError(f"{self.root} already has an expert named {name!r}")
        if meta.get("base_fingerprint") != self.base_fingerprint:
            raise LibraryError(
                f"{expert_dir} was trained on base model {meta.get('base_model')!r} (fingerprint "
                f"{meta.get('base_fingerprint')}), but this library is for {self.base_model!r} "
                f"({self.base_fingerprint}): retrain it on the library's base model"
            )
        lora = load_lora(expert_dir)
        gates = load_gates(expert_dir)
        self._check_gates(name, lora, gates)

        def fill(tmp: Path) -> None:
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_META, GATES):
                shutil.copy2(expert_dir / file, tmp / file)

        write_dir_atomically(self.root / "experts" / name, fill)
        first = next(iter(lora.values()))
        entry = {
            "name": name,
            "task": meta.get("task"),
            "path": f"experts/{name}",
            "modules": len(lora),
            "rank": int(first.A.shape[0]),
            "metrics": meta.get("metrics", {}),
        }
        self.manifest["experts"].append(entry)
        write_json(self.root / MANIFEST, self.manifest)
        return name

    # -- reading --------------------------------------------------------------------------
    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base_fingerprint"]

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.manifest["experts"]]

    def entry(self, name: str) -> dict[str, Any]:
        for e in self.manifest["experts"]:
            if e["name"] == name:
                return e
        raise LibraryError(f"no expert {name!r} in {self.root}; it has: {', '.join(self.names)}")

    def expert_dir(self, name: str) -> Path:
        return self.root / self.entry(name)["path"]

    def lora(self, name: str) -> dict[str, LoraWeights]:
        return load_lora(self.expert_dir(name))

    def gates(self, name: str) -> dict[str, torch.Tensor]:
        return load_gates(self.expert_dir(name))

    def metadata(self, name: str) -> dict[str, Any]:
        return load_metadata(self.expert_dir(name))

    def stacked(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The experts (all by default) stacked per adapted module, in ``names`` order:
        ``<module>.lora_A`` (E, r, d_in), ``<module>.lora_B`` (E, r, d_out), pre-scaled (see
        ``stack_experts``), and ``<module>.gate`` (E, d_in).

        The whole library's stack is cached in ``stacks/<key>.safetensors`` (key: the experts'
        names and their files' sizes and modification times; an older stack is removed), so
        routing reads one file of a few hundred tensors, not two files per expert."""
        names = list(names or self.names)
        key = self._stack_key(names) if names == self.names else None
        path = self.root / STACKS / f"{key}.safetensors"
        if key and path.exists():
            try:
                with safe_open(path, "pt") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError):
                pass  # a damaged cache is rebuilt below
        stacks = self._stack(names)
        if key:
            path.parent.mkdir(exist_ok=True)
            write_safetensors(path, stacks)
            for old in path.parent.glob("*.safetensors"):
                if old != path:
                    old.unlink(missing_ok=True)
        return stacks

    def _stack(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Stack expert by expert into preallocated tensors: the peak memory is the stacks plus
        one expert (holding every expert while stacking would double it)."""
        if not names:
            raise LibraryError(f"no experts to stack in {self.root}: add some first")
        rank = max(int(read_json(self.expert_dir(n) / ADAPTER_CONFIG).get("r", 8)) for n in names)
        stacks: dict[str, torch.Tensor] = {}
        modules: list[str] = []
        for e, name in enumerate(names):
            lora, gates = self.lora(name), self.gates(name)
            self._check_gates(name, lora, gates)
            if not modules:
                modules = sorted(lora)
                for module, w in lora.items():
                    (d_out, _), d_in = w.B.shape, w.A.shape[1]
                    stacks[f"{module}.lora_A"] = torch.zeros(len(names), rank, d_in)
                    stacks[f"{module}.lora_B"] = torch.zeros(len(names), rank, d_out)
                    stacks[f"{module}.gate"] = torch.zeros(len(names), d_in)
            elif sorted(lora) != modules:
                raise LibraryError(f"experts {names[0]!r} and {name!r} adapt different modules")
            for module, w in lora.items():
                A, B = stacks[f"{module}.lora_A"], stacks[f"{module}.lora_B"]
                r = w.A.shape[0]
                if r > rank or w.A.shape[1:] != A.shape[2:] or w.B.shape != (B.shape[2], r):
                    raise LibraryError(f"expert {name!r}: LoRA factors of {module} have shapes "
                                       f"{tuple(w.A.shape)} and {tuple(w.B.shape)}, which do "
                                       f"not fit the other experts' (rank <= {rank})")
                put_expert(A, B, e, w)
                stacks[f"{module}.gate"][e] = gates[module]
        return stacks

    def _stack_key(self, names: list[str]) -> str | None:
        """A hash of the experts' files (None if one is missing: loading it then says which)."""
        files = []
        for name in names:
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATES):
                path = self.expert_dir(name) / file
                if not path.exists():
                    return None
                stat = path.stat()
                files.append([name, file, stat.st_size, stat.st_mtime_ns])
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]

    # -- checks ---------------------------------------------------------------------------
    @staticmethod
    def _check_gates(name: str, lora: dict[str, LoraWeights], gates: dict[str, torch.Tensor]):
        if set(gates) != set(lora):
            missing = sorted(set(lora) - set(gates))[:3]
            raise LibraryError(f"expert {name!r}: gates do not cover its LoRA modules {missing}")
        for module, weights in lora.items():
            if gates[module].shape != (weights.A.shape[1],):
                raise LibraryError(
                    f"expert {name!r}: gate of {module} has shape {tuple(gates[module].shape)}, "
                    f"expected ({weights.A.shape[1]},)"
                )

    def verify(self) -> list[str]:
        """Every problem found, as one line each (an empty list means the library is sound)."""
        problems: list[str] = []
        modules: set[str] | None = None
        for name in self.names:
            try:
                meta = self.metadata(name)
                lora, gates = self.lora(name), self.gates(name)
                self._check_gates(name, lora, gates)
            except LibraryError as err:
                problems.append(str(err))
                continue
            if meta.get("base_fingerprint") != self.base_fingerprint:
                problems.append(f"expert {name!r} was trained on another base model")
            bad = [m for m, w in lora.items()
                   if not (w.A.isfinite().all() and w.B.isfinite().all())]
            bad += [m for m, g in gates.items() if not g.isfinite().all()]
            if bad:
                problems.append(f"expert {name!r} has non-finite weights in {bad[0]}")
            if modules is not None and set(lora) != modules:
                problems.append(f"expert {name!r} adapts other modules than the first expert")
            modules = modules if modules is not None else set(lora)
        return problems

"""Turn a base model into a routed model: every adapted linear becomes a ``RoutedLinear``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from phatgoose.errors import ModelError
from phatgoose.library.library import ExpertLibrary
from phatgoose.models import fingerprint, linear_dims
from phatgoose.routing.container import LoraWeights, RoutedLinear
from phatgoose.routing.routers import FixedWeights, PhatgooseRouter

# A router factory builds the router of one module from the library, the module name and the
# experts' names. New routing methods register here.
RouterFactory = Callable[[ExpertLibrary, str, list[str], dict], nn.Module]


def _phatgoose(library: ExpertLibrary, module: str, names: list[str], state: dict) -> nn.Module:
    gates = state.setdefault("gates", {n: library.gates(n) for n in names})
    return PhatgooseRouter(torch.stack([gates[n][module] for n in names]), top_k=state["top_k"])


def _uniform(library: ExpertLibrary, module: str, names: list[str], state: dict) -> nn.Module:
    return FixedWeights(torch.full((len(names),), 1.0 / len(names)))


ROUTERS: dict[str, RouterFactory] = {"phatgoose": _phatgoose, "uniform": _uniform}
METHODS = sorted(ROUTERS) + ["single:<expert>"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def route(
    model: nn.Module,
    library: ExpertLibrary,
    method: str = "phatgoose",
    top_k: int = 2,
    experts: list[str] | None = None,
    check_fingerprint: bool = True,
) -> nn.Module:
    """Replace, in place, every module the library's experts adapt by a routed module.

    ``method`` is "phatgoose" (top-k over the gates), "uniform" (every expert at 1/E) or
    "single:<expert>" (one expert alone). Returns the model, which keeps working with
    ``model(...)`` and ``model.generate(...)``."""
    if any(isinstance(m, RoutedLinear) for m in model.modules()):
        raise ModelError("this model is already routed: call phatgoose.unroute(model) first")
    if method.startswith("single:"):
        experts, method = [method.removeprefix("single:")], "uniform"
    if method not in ROUTERS:
        raise ModelError(f"unknown routing method {method!r}; choose from {', '.join(METHODS)}")
    names = experts or library.names
    if not names:
        raise ModelError(f"{library.root} has no experts")
    for name in names:
        library.entry(name)  # unknown names fail here, with the list of known ones
    if check_fingerprint and fingerprint(model) != library.base_fingerprint:
        raise ModelError(
            f"the model's weights (fingerprint {fingerprint(model)}) differ from the base model "
            f"the library was trained on ({library.base_model!r}, {library.base_fingerprint}): "
            "load that base model"
        )
    loras = {n: library.lora(n) for n in names}
    modules = sorted(loras[names[0]])
    for n in names[1:]:
        if sorted(loras[n]) != modules:
            raise ModelError(f"experts {names[0]!r} and {n!r} adapt different modules")
    _check_fit(model, loras[names[0]])
    state = {"top_k": top_k}
    for module in modules:
        base = model.get_submodule(module)
        router = ROUTERS[method](library, module, names, state)
        weights = [loras[n][module] for n in names]
        _set_module(model, module, RoutedLinear(base, weights, router).to(base.weight.device))
    return model


def _check_fit(model: nn.Module, lora: dict[str, LoraWeights]) -> None:
    """Every adapted module exists in the model, is linear, and has the experts' shapes."""
    for module, w in lora.items():
        try:
            d_in, d_out = linear_dims(model.get_submodule(module))
        except AttributeError:
            raise ModelError(
                f"the experts adapt {module}, which {type(model).__name__} does not have: "
                "they were trained on another architecture"
            ) from None
        if (w.A.shape[1], w.B.shape[0]) != (d_in, d_out):
            raise ModelError(
                f"the experts' LoRA for {module} maps {w.A.shape[1]} -> {w.B.shape[0]} features, "
                f"but the model's layer maps {d_in} -> {d_out}: wrong base model"
            )


def unroute(model: nn.Module) -> nn.Module:
    """Put every routed module's base layer back (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedLinear):
            _set_module(model, name, module.base)
    return model


def routed_modules(model: nn.Module) -> dict[str, RoutedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLinear)}

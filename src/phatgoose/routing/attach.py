"""Turn a base model into a routed model: every adapted linear becomes a ``RoutedLinear``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from phatgoose.errors import ModelError
from phatgoose.library.expert import read_safetensors
from phatgoose.library.library import ExpertLibrary
from phatgoose.models import fingerprint, linear_dims
from phatgoose.routing.container import RoutedLinear, share_projections
from phatgoose.routing.routers import (
    ArrowRouter,
    FixedWeights,
    PhatgooseRouter,
    top_right_singular_vector,
)

# A router factory builds one module's router from the library, the module name, the experts'
# names and their stacked tensors at that module (``ExpertLibrary.stacked``: lora_A, lora_B,
# gate), and returns it with the factors to mix. ``state`` carries the method's settings
# (top_k, ...) and anything worth loading once for all modules.
Routed = tuple[nn.Module, torch.Tensor, torch.Tensor]
RouterFactory = Callable[[ExpertLibrary, str, list[str], dict[str, torch.Tensor], dict], Routed]


def _phatgoose(library, module, names, stack, state) -> Routed:
    """Top-k over the experts' trained gates."""
    return PhatgooseRouter(stack["gate"], top_k=state["top_k"]), stack["lora_A"], stack["lora_B"]


AVERAGE_ACTIVATION = "average_activation.safetensors"


def _average_activation(library, module, names, stack, state) -> Routed:
    """Top-k, as PHATGOOSE, over each expert's mean module input (see routing.vectors)."""
    if "averages" not in state:
        missing = [n for n in names if not (library.expert_dir(n) / AVERAGE_ACTIVATION).exists()]
        if missing:
            raise ModelError(
                f"expert {missing[0]!r} has no average activations: compute them first with "
                f"`phatgoose library vectors {library.root}`"
            )
        state["averages"] = {n: read_safetensors(library.expert_dir(n) / AVERAGE_ACTIVATION)
                             for n in names}
    vectors = torch.stack([state["averages"][n][module] for n in names])
    return PhatgooseRouter(vectors, top_k=state["top_k"]), stack["lora_A"], stack["lora_B"]


def _uniform(library, module, names, stack, state) -> Routed:
    """Every expert's output at weight 1/E. Since LoRA outputs are linear in x, this is also
    the exact merge of the experts' deltas, mean_i s_i B_i A_i (a concatenated LoRA of rank E r)."""
    weights = torch.full((len(names),), 1.0 / len(names))
    return FixedWeights(weights), stack["lora_A"], stack["lora_B"]


def _merged_factors(library, module, names, stack, state) -> Routed:
    """The reference's shipped merge: one LoRA of the averaged factors, (mean s_i B_i)(mean A_i),
    which is not the mean of the deltas."""
    if len({library.entry(n)["rank"] for n in names}) != 1:
        raise ModelError("merged-factors needs experts of one rank: their factors are averaged")
    A = stack["lora_A"].float().mean(0, keepdim=True)
    B = stack["lora_B"].float().mean(0, keepdim=True)  # pre-scaled: mean of s_i B_i
    return FixedWeights(torch.ones(1)), A, B


def _arrow(library, module, names, stack, state) -> Routed:
    """Arrow: prototypes are the top right singular vectors of each expert's B A."""
    A, B = stack["lora_A"], stack["lora_B"]  # B[e] is s_e B_e^T; scaling leaves the vectors
    prototypes = torch.stack([top_right_singular_vector(a, b.T) for a, b in zip(A, B)])
    return ArrowRouter(prototypes, state["top_k"], state.get("temperature", 1.0)), A, B


ROUTERS: dict[str, RouterFactory] = {
    "phatgoose": _phatgoose,
    "average-activation": _average_activation,
    "uniform": _uniform,
    "merged-delta": _uniform,
    "merged-factors": _merged_factors,
    "arrow": _arrow,
}
METHODS = sorted(ROUTERS) + ["single:<expert>"]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def route(
    model: nn.Module,
    library: ExpertLibrary,
    method: str = "phatgoose",
    top_k: int = 2,
    experts: list[str] | None = None,
    check_fingerprint: bool = True,
    temperature: float = 1.0,
) -> nn.Module:
    """Replace, in place, every module the library's experts adapt by a routed module.

    ``method``: "phatgoose" (top-k over the gates), "arrow" (top-k over SVD prototypes, softmax
    temperature ``temperature``), "uniform" = "merged-delta" (every expert at 1/E, the exact mean
    of the deltas), "merged-factors" (one LoRA of averaged factors), or "single:<expert>" (one
    expert alone). Returns the model, which keeps working with ``model(...)`` and
    ``model.generate(...)``."""
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
    found = fingerprint(model) if check_fingerprint else library.base_fingerprint
    if found != library.base_fingerprint:
        raise ModelError(
            f"the model's weights (fingerprint {found}) differ from the base model "
            f"the library was trained on ({library.base_model!r}, {library.base_fingerprint}): "
            "load that base model"
        )
    stacks = library.stacked(names)
    modules = sorted({key.rsplit(".", 1)[0] for key in stacks})
    check_fit(model, {m: (stacks[f"{m}.lora_A"].shape[2], stacks[f"{m}.lora_B"].shape[2])
                      for m in modules})
    state = {"top_k": top_k, "temperature": temperature}
    for module in modules:  # popped as used, so the experts are in memory once
        base = model.get_submodule(module)
        stack = {part: stacks.pop(f"{module}.{part}") for part in ("lora_A", "lora_B", "gate")}
        router, A, B = ROUTERS[method](library, module, names, stack, state)
        set_module(model, module, RoutedLinear(base, A, B, router).to(base.weight.device))
    share_projections(routed_modules(model))
    return model


def check_fit(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> None:
    """Every adapted module exists in the model, is linear, and maps the experts' (d_in, d_out)."""
    for module, (d_in, d_out) in shapes.items():
        try:
            found = linear_dims(model.get_submodule(module))
        except AttributeError:
            raise ModelError(
                f"the experts adapt {module}, which {type(model).__name__} does not have: "
                "they were trained on another architecture"
            ) from None
        if found != (d_in, d_out):
            raise ModelError(
                f"the experts' LoRA for {module} maps {d_in} -> {d_out} features, "
                f"but the model's layer maps {found[0]} -> {found[1]}: wrong base model"
            )


def unroute(model: nn.Module) -> nn.Module:
    """Put every routed module's base layer back (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedLinear):
            set_module(model, name, module.base)
    return model


def routed_modules(model: nn.Module) -> dict[str, RoutedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLinear)}

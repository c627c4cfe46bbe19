"""Routing: routers (selectors), the routed module (container), and attaching a library."""

from phatgoose.library.expert import LoraWeights
from phatgoose.routing import container, fused
from phatgoose.routing.attach import METHODS, ROUTERS, route, routed_modules, unroute
from phatgoose.routing.container import RoutedLinear
from phatgoose.routing.routers import (
    ArrowRouter,
    FixedWeights,
    PhatgooseRouter,
    SigmoidGate,
    TopKRouter,
    standardise,
    top_k_softmax,
    top_right_singular_vector,
)

__all__ = [
    "METHODS",
    "ArrowRouter",
    "ROUTERS",
    "FixedWeights",
    "LoraWeights",
    "PhatgooseRouter",
    "RoutedLinear",
    "SigmoidGate",
    "TopKRouter",
    "route",
    "routed_modules",
    "standardise",
    "top_k_softmax",
    "top_right_singular_vector",
    "container",
    "fused",
    "unroute",
]

"""Routing: routers (selectors), the routed module (container), and attaching a library."""

from phatgoose.routing.attach import METHODS, ROUTERS, route, routed_modules, unroute
from phatgoose.routing.container import LoraWeights, RoutedLinear
from phatgoose.routing.routers import (
    FixedWeights,
    PhatgooseRouter,
    SigmoidGate,
    standardise,
    top_k_softmax,
)

__all__ = [
    "METHODS",
    "ROUTERS",
    "FixedWeights",
    "LoraWeights",
    "PhatgooseRouter",
    "RoutedLinear",
    "SigmoidGate",
    "route",
    "routed_modules",
    "standardise",
    "top_k_softmax",
    "unroute",
]

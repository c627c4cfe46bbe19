"""Training experts (LoRA, with PEFT) and their PHATGOOSE gates."""

from phatgoose.experts.loop import TrainConfig, TrainResult, train
from phatgoose.experts.train import ExpertConfig, GateConfig, train_expert, train_gate

__all__ = [
    "ExpertConfig",
    "GateConfig",
    "TrainConfig",
    "TrainResult",
    "train",
    "train_expert",
    "train_gate",
]

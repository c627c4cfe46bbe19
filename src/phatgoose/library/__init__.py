"""Expert library: what experts exist, on disk (safetensors + JSON, never pickles)."""

from phatgoose.library.expert import load_gates, load_lora, load_metadata
from phatgoose.library.library import ExpertLibrary, expert_name

__all__ = ["ExpertLibrary", "expert_name", "load_gates", "load_lora", "load_metadata"]

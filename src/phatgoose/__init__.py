"""phatgoose: PHATGOOSE routing among independently trained LoRA experts.

    base = load_base_model()                                # embedded SmolLM2-135M-Instruct
    train_expert(base, task, train, val, "experts/t1")      # a PEFT LoRA adapter
    train_gate(base, "experts/t1", train, val)              # its sigmoid gate, post hoc
    library = ExpertLibrary.build("library", ["experts/t1", ...])
    route(base.model, library, top_k=2)                     # per-token top-k routing
    evaluate(base, {"task": test_examples})
"""

from phatgoose.data import Example, Task, fetch_bigbench, load_task
from phatgoose.errors import PhatgooseError
from phatgoose.eval import EvalConfig, evaluate
from phatgoose.experts import ExpertConfig, GateConfig, train_expert, train_gate
from phatgoose.library import ExpertLibrary
from phatgoose.models import EMBEDDED_MODEL, load_base_model
from phatgoose.routing import route, unroute

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL",
    "EvalConfig",
    "Example",
    "ExpertConfig",
    "ExpertLibrary",
    "GateConfig",
    "PhatgooseError",
    "Task",
    "evaluate",
    "fetch_bigbench",
    "load_base_model",
    "load_task",
    "route",
    "train_expert",
    "train_gate",
    "unroute",
]

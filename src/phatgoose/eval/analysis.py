"""Where PHATGOOSE sends each task's tokens: the share of routing weight each expert receives,
per task and adapted module, and plots of it (tasks x experts; layers x experts per task)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from phatgoose.data.encode import collate, encode
from phatgoose.data.tasks import Example
from phatgoose.eval.evaluate import EvalConfig
from phatgoose.library.expert import write_atomically
from phatgoose.library.library import ExpertLibrary
from phatgoose.models import BaseModel
from phatgoose.routing.attach import route, routed_modules, unroute


@torch.no_grad()
def routing_shares(
    base: BaseModel, library: ExpertLibrary, eval_sets: dict[str, list[Example]], top_k: int,
    max_examples: int, config: EvalConfig,
) -> dict:
    """For each task, module and expert: the mean PHATGOOSE routing weight over every token of
    the task's first ``max_examples`` examples (prompt and answer, one unpadded example at a
    time). Each module's shares sum to 1 over the experts."""
    route(base.model, library, method="phatgoose", top_k=top_k)
    modules = routed_modules(base.model)
    totals: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def recorder(name: str):
        def hook(module, inputs, output):
            weights = module.mixing_weights(inputs[0]).reshape(-1, module.num_experts).float()
            totals[name] += weights.sum(0).cpu()
            tokens[name] += weights.shape[0]
        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items()]
    shares = {}
    try:
        for task, examples in eval_sets.items():
            for name, m in modules.items():
                totals[name], tokens[name] = torch.zeros(m.num_experts), 0
            for example in examples[:max_examples]:
                batch = collate([encode(base.tokenizer, example.prompt, example.continuation,
                                        base.is_seq2seq, config.max_input_tokens,
                                        config.max_target_tokens)],
                                base.tokenizer.pad_token_id, base.is_seq2seq)
                batch.pop("labels")
                base.model(**{k: v.to(base.model.device) for k, v in batch.items()})
            shares[task] = {n: (totals[n] / max(tokens[n], 1)).tolist() for n in modules}
    finally:
        for handle in handles:
            handle.remove()
        unroute(base.model)
    return {"experts": library.names, "modules": list(modules), "tasks": shares}


def layer_of(module: str) -> str:
    """The block a module belongs to: its name up to the first number ("model.layers.3")."""
    match = re.match(r"(.*?\.\d+)(\.|$)", module)
    return match.group(1) if match else module


def plot_routing(shares: dict, out: Path, suites: dict[str, list[str]] | None = None) -> None:
    """``routing_heatmap.png`` (tasks x experts, mean over modules) and ``routing_layers.png``
    (one panel per task: layers x experts, mean over each layer's modules)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts, modules = shares["experts"], shares["modules"]
    order = [t for ts in (suites or {}).values() for t in ts if t in shares["tasks"]]
    tasks = list(dict.fromkeys(order + list(shares["tasks"])))
    per_module = {t: torch.tensor([shares["tasks"][t][m] for m in modules]) for t in tasks}
    grid = torch.stack([per_module[t].mean(0) for t in tasks]).numpy()
    fig, ax = plt.subplots(figsize=(max(6.5, 3.0 + 0.55 * len(experts)),
                                    max(4.0, 2.8 + 0.35 * len(tasks))))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    for i in range(len(tasks)):
        for j in range(len(experts)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5,
                    color="white" if grid[i, j] < grid.max() / 2 else "black")
    ax.set_xlabel("expert")
    ax.set_title("PHATGOOSE: share of routing weight\n(mean over tokens and modules)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    write_atomically(out / "routing_heatmap.png", lambda tmp: fig.savefig(tmp, dpi=130,
                                                                          format="png"))
    plt.close(fig)

    layers = list(dict.fromkeys(layer_of(m) for m in modules))
    index = {layer: [i for i, m in enumerate(modules) if layer_of(m) == layer] for layer in layers}
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        by_layer = torch.stack([per_module[task][index[layer]].mean(0) for layer in layers])
        ax.imshow(by_layer.numpy(), cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_title(task, fontsize=7)
        ax.set_xticks(range(len(experts)), [str(i) for i in range(len(experts))], fontsize=5)
        ax.set_yticks([0, len(layers) - 1], ["first", "last"], fontsize=6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("PHATGOOSE routing share by layer (rows: layers; columns: experts "
                 + ", ".join(f"{i}={e}" for i, e in enumerate(experts)) + ")", fontsize=7,
                 wrap=True)
    fig.tight_layout()
    write_atomically(out / "routing_layers.png", lambda tmp: fig.savefig(tmp, dpi=110,
                                                                         format="png"))
    plt.close(fig)

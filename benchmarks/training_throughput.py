"""Training throughput on the embedded SmolLM2-135M (issue 4, target 7): tokens/s of an expert
step (LoRA rank 8 on all 210 linear modules, AdamW on A and B) and of a gate step (the same
expert frozen, AdamW on the 210 gate vectors only), in fp32 and in bf16 autocast.

    python benchmarks/training_throughput.py [--batch 8] [--repeats 3]
        [--dtypes fp32 bf16 bf16-attention]

A gate step should cost no more than an expert step: it needs no weight gradients for the
frozen LoRA factors and no optimizer state for them (only the gates are parameters).
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from phatgoose.data.encode import collate, encode, token_nll
from phatgoose.data.tasks import load_task
from phatgoose.experts.loop import autocast, training_attention
from phatgoose.library.expert import LoraWeights
from phatgoose.models import linear_dims, load_base_model, resolve_target_modules
from phatgoose.routing.attach import set_module, unroute
from phatgoose.routing.container import RoutedLinear
from phatgoose.routing.routers import SigmoidGate


def median_step_seconds(model, params, batch, dtype: str, repeats: int) -> float:
    """Median seconds of an optimizer step; ``dtype``: fp32, bf16 (autocast, with attention in
    fp32 as the training loop runs it), or bf16-attention (attention in bf16 as well).
    ``model`` is the transformers model (with LoRA layers injected, for an expert), as the
    training loop gets it: its forward takes ``logits_to_keep`` (a PeftModel's does not)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    cpu, bf16 = torch.device("cpu"), dtype != "fp32"
    with training_attention(model, dtype == "bf16", cpu):
        for i in range(repeats + 1):  # the first step warms up (and allocates optimizer state)
            start = time.perf_counter()
            with autocast(bf16, cpu):
                loss = token_nll(model, batch, False)[0].sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="logical_fallacy_detection")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16", "bf16-attention"],
                        help="bf16-attention: bf16 autocast with attention in bf16 too (the "
                        "training loop runs it in fp32 since torch's bf16 backward is slow)")
    args = parser.parse_args()
    base = load_base_model()
    model = base.model
    examples = load_task(args.task).examples[: args.batch]
    batch = collate([encode(base.tokenizer, e.prompt, e.continuation, False, 256, 32)
                     for e in examples], base.tokenizer.pad_token_id, False)
    tokens = int(batch["attention_mask"].sum())
    targets = resolve_target_modules(model)
    rows = []

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    expert_params = [p for p in peft.parameters() if p.requires_grad]
    for dtype in args.dtypes:
        rows.append(("expert", dtype, sum(p.numel() for p in expert_params),
                     median_step_seconds(model, expert_params, batch, dtype,
                                         args.repeats)))
    peft.unload()

    gates = {}
    generator = torch.Generator().manual_seed(0)
    for name in resolve_target_modules(model):
        layer = model.get_submodule(name)
        d_in, d_out = linear_dims(layer)
        lora = LoraWeights(torch.randn(8, d_in, generator=generator) / d_in**0.5,
                           torch.randn(d_out, 8, generator=generator) * 0.01, 2.0)
        gates[name] = SigmoidGate(d_in)
        set_module(model, name, RoutedLinear.from_experts(layer, [lora], gates[name]))
    gate_params = [g.vectors for g in gates.values()]
    for dtype in args.dtypes:
        rows.append(("gate", dtype, sum(p.numel() for p in gate_params),
                     median_step_seconds(model, gate_params, batch, dtype,
                                         args.repeats)))
    unroute(model)

    print(f"batch {args.batch} sequences of {args.task}, {tokens} tokens per step, "
          f"{torch.get_num_threads()} threads")
    print("| step | dtype | trained parameters | median s/step | tokens/s |")
    print("|---|---|---:|---:|---:|")
    for kind, dtype, n, seconds in rows:
        print(f"| {kind} | {dtype} | {n:,} | {seconds:.2f} | {tokens / seconds:.0f} |")


if __name__ == "__main__":
    main()

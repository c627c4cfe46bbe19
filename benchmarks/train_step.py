"""Time one expert training step (forward + backward) on the embedded SmolLM2, with the output
head applied only at label positions (``logits_to_keep``, the default) vs at every position.

    python benchmarks/train_step.py [--batch 8] [--repeats 3]
"""

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from phatgoose.data.encode import IGNORE, collate, encode
from phatgoose.data.tasks import load_task
from phatgoose.models import load_base_model, resolve_target_modules


def full_head_nll(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE)).sum()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="logical_fallacy_detection")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from phatgoose.data.encode import token_nll

    base = load_base_model()
    model = base.model
    targets = resolve_target_modules(model)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    examples = load_task(args.task).examples[: args.batch]
    batch = collate([encode(base.tokenizer, e.prompt, e.continuation, False) for e in examples],
                    base.tokenizer.pad_token_id, False)
    variants = {"head at label positions": lambda: token_nll(model, batch, False)[0].sum(),
                "head everywhere": lambda: full_head_nll(model, batch)}
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, loss in variants.items():  # interleaved, so machine noise hits both
            start = time.perf_counter()
            loss().backward()
            times[name].append(time.perf_counter() - start)
    tokens = batch["attention_mask"].sum().item()
    print(f"batch {args.batch}, {tokens} tokens, threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"{name:>24}: median {sorted(t)[len(t) // 2]:.2f} s/step")


if __name__ == "__main__":
    main()

"""Expert and gate training: what changes, what must not, and stopping on a NaN loss."""

import hashlib
import json
import random

import pytest
import torch
from conftest import toy_examples
from peft import PeftModel

import phatgoose.experts.loop as loop
from phatgoose.data.encode import Encoded
from phatgoose.errors import TrainingDivergedError
from phatgoose.experts import ExpertConfig, GateConfig, train_expert, train_gate
from phatgoose.experts.loop import batches
from phatgoose.library import load_gates, load_lora, load_metadata
from phatgoose.routing import RoutedLinear

FAST = dict(steps=8, lr=1e-2, batch_size=4, eval_every=4, rank=4, alpha=8.0)


def checksums(model) -> dict[str, str]:
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_expert_training_learns_and_saves_a_peft_adapter(base, tmp_path):
    before = checksums(base.model)
    examples = toy_examples(32)
    out = train_expert(base, "toy", examples[:24], examples[24:], tmp_path / "toy",
                       ExpertConfig(**FAST), log_path=tmp_path / "log.jsonl")
    assert checksums(base.model) == before  # the base model is left as it was
    assert not any("lora" in n for n, _ in base.model.named_modules())
    meta = load_metadata(out)
    assert meta["base_fingerprint"] == base.fingerprint and meta["task"] == "toy"
    assert meta["config"]["rank"] == 4 and meta["metrics"]["best_step"] in (4, 8)
    lora = load_lora(out)
    assert all(w.B.abs().sum() > 0 for w in lora.values())  # B moved away from zero
    assert all(w.scaling == 2.0 for w in lora.values())
    records = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 8
    assert len([r for r in records if "val_loss" in r]) == 2
    peft = PeftModel.from_pretrained(base.model, out)  # loads as a standard PEFT adapter
    assert any("lora_A" in n for n, _ in peft.named_parameters())
    peft.unload()


def test_reference_init_is_used(llama, tmp_path):
    out = train_expert(llama, "toy", toy_examples(8), [], tmp_path / "e",
                       ExpertConfig(steps=1, lr=1e-9, batch_size=2, rank=8))
    A = torch.cat([w.A.flatten() for w in load_lora(out).values()])
    assert abs(A.std().item() - 0.01) < 0.002  # A ~ N(0, 0.01^2); scaling 1/r by default
    assert next(iter(load_lora(out).values())).scaling == 1 / 8


def test_gate_training_changes_the_gates_and_nothing_else(base, tmp_path):
    examples = toy_examples(32)
    expert = train_expert(base, "toy", examples[:24], examples[24:], tmp_path / "toy",
                          ExpertConfig(**FAST))
    model_before = checksums(base.model)
    adapter_before = file_digest(expert / "adapter_model.safetensors")
    seen = {}
    original = loop.train

    def spy(model, params, *args, **kwargs):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["params"] = set(params)
        return original(model, params, *args, **kwargs)

    loop_train = pytest.MonkeyPatch()
    loop_train.setattr("phatgoose.experts.train.train", spy)
    try:
        train_gate(base, expert, examples[:24], examples[24:],
                   GateConfig(steps=6, lr=1e-2, batch_size=4, eval_every=3))
    finally:
        loop_train.undo()
    gates = load_gates(expert)
    assert set(gates) == set(load_lora(expert))
    assert all(g.abs().sum() > 0 for g in gates.values())  # every gate moved from zero
    assert all(n.endswith("router.vectors") for n in seen["trainable"])  # only gates train
    assert len(seen["trainable"]) == len(gates)
    assert checksums(base.model) == model_before
    assert file_digest(expert / "adapter_model.safetensors") == adapter_before
    assert not any(isinstance(m, RoutedLinear) for m in base.model.modules())
    assert load_metadata(expert)["gate"]["config"]["steps"] == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(llama, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.token_nll

    def poisoned(model, batch, seq2seq):
        calls["n"] += 1
        nll, mask = real(model, batch, seq2seq)
        return (nll * float("nan") if calls["n"] == 4 else nll), mask

    monkeypatch.setattr(loop, "token_nll", poisoned)
    with pytest.raises(TrainingDivergedError, match="step 4; kept the last good parameters"):
        train_expert(llama, "toy", toy_examples(16), [], tmp_path / "e",
                     ExpertConfig(**{**FAST, "steps": 10}))
    meta = load_metadata(tmp_path / "e")
    assert meta["metrics"]["diverged_at"] == 4 and meta["metrics"]["best_step"] == 3
    assert all(w.A.isfinite().all() and w.B.isfinite().all()
               for w in load_lora(tmp_path / "e").values())


def test_interrupted_training_resumes_from_its_checkpoint_as_if_never_stopped(
    llama, tmp_path, monkeypatch
):
    examples = toy_examples(20)
    # warm-up over half the steps and 2 forwards per step: the schedule and the batch stream
    # must both be restored to their place
    config = ExpertConfig(**{**FAST, "steps": 10, "eval_every": 2, "warmup_fraction": 0.5,
                             "grad_accum": 2, "batch_size": 2})
    reference = train_expert(llama, "toy", examples[:16], examples[16:], tmp_path / "ref", config,
                             log_path=tmp_path / "ref.jsonl")
    real, calls = loop.token_nll, {"n": 0}

    def interrupted(model, batch, seq2seq):
        calls["n"] += 1  # per step 2 training calls, and every 2 steps 2 validation calls
        if calls["n"] == 22:  # during step 8: after step 6's checkpoint
            raise KeyboardInterrupt
        return real(model, batch, seq2seq)

    monkeypatch.setattr(loop, "token_nll", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_expert(llama, "toy", examples[:16], examples[16:], tmp_path / "e", config,
                     checkpoint_every=3, log_path=tmp_path / "e.jsonl")
    monkeypatch.undo()
    with (tmp_path / "e.jsonl").open("a") as log:
        log.write('{"time": 1, "st')  # a line cut short by a kill
    checkpoint = tmp_path / ".e.checkpoint"
    assert not (tmp_path / "e").exists()  # nothing half-written
    assert loop.read_json(checkpoint / "state.json")["step"] == 6
    assert not any("lora" in n for n, _ in llama.model.named_modules())

    resumed = train_expert(llama, "toy", examples[:16], examples[16:], tmp_path / "e", config,
                           checkpoint_every=3, log_path=tmp_path / "e.jsonl")
    metrics, expected = load_metadata(resumed)["metrics"], load_metadata(reference)["metrics"]
    assert metrics["resumed_from_step"] == 6 and not checkpoint.exists()
    assert (metrics["best_step"], metrics["best_val_loss"]) == (
        expected["best_step"], expected["best_val_loss"])
    # the log holds each step once, with the uninterrupted run's values (step 7 was logged
    # before the interruption, and again after the resume: kept once)
    def records(path):
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in path.read_text().splitlines()]
    assert records(tmp_path / "e.jsonl") == records(tmp_path / "ref.jsonl")
    for module, weights in load_lora(reference).items():  # bitwise the uninterrupted result
        assert torch.equal(weights.A, load_lora(resumed)[module].A)
        assert torch.equal(weights.B, load_lora(resumed)[module].B)


def test_interrupted_gate_training_resumes_but_not_for_a_retrained_expert(
    llama, tmp_path, monkeypatch
):
    examples = toy_examples(24)
    expert = train_expert(llama, "toy", examples[:16], examples[16:], tmp_path / "toy",
                          ExpertConfig(**FAST))
    config = GateConfig(steps=8, lr=1e-2, batch_size=4, eval_every=4)
    train_gate(llama, expert, examples[:16], examples[16:], config)
    reference = load_gates(expert)
    real = loop.token_nll

    def interrupt_at(n):
        def interrupted(model, batch, seq2seq):
            interrupted.calls += 1
            if interrupted.calls == n:
                raise KeyboardInterrupt
            return real(model, batch, seq2seq)
        interrupted.calls = 0
        return interrupted

    # 1 training call per step, 2 validation calls every 4 steps: call 9 is in step 7
    monkeypatch.setattr(loop, "token_nll", interrupt_at(9))
    with pytest.raises(KeyboardInterrupt):
        train_gate(llama, expert, examples[:16], examples[16:], config, checkpoint_every=3)
    monkeypatch.undo()
    checkpoint = tmp_path / ".toy.gate-checkpoint"
    assert loop.read_json(checkpoint / "state.json")["step"] == 6
    assert not any(isinstance(m, RoutedLinear) for m in llama.model.modules())  # unrouted
    train_gate(llama, expert, examples[:16], examples[16:], config, checkpoint_every=3)
    assert load_metadata(expert)["gate"]["resumed_from_step"] == 6
    assert not checkpoint.exists()
    for module, gate in reference.items():  # bitwise the uninterrupted gates
        assert torch.equal(gate, load_gates(expert)[module])

    # interrupted again, then the expert is retrained: its gate starts over
    monkeypatch.setattr(loop, "token_nll", interrupt_at(9))
    with pytest.raises(KeyboardInterrupt):
        train_gate(llama, expert, examples[:16], examples[16:], config, checkpoint_every=3)
    monkeypatch.undo()
    train_expert(llama, "toy", examples[:16], examples[16:], expert,
                 ExpertConfig(**{**FAST, "lr": 2e-2}))
    train_gate(llama, expert, examples[:16], examples[16:], config, checkpoint_every=3)
    assert load_metadata(expert)["gate"]["resumed_from_step"] == 0


def test_a_checkpoint_of_other_settings_is_not_resumed(llama, tmp_path, monkeypatch):
    examples = toy_examples(16)

    def interrupt_at_step_5(model, batch, seq2seq):
        interrupt_at_step_5.n += 1
        if interrupt_at_step_5.n == 5:
            raise KeyboardInterrupt
        return real(model, batch, seq2seq)

    real, interrupt_at_step_5.n = loop.token_nll, 0
    monkeypatch.setattr(loop, "token_nll", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_expert(llama, "toy", examples, [], tmp_path / "e", ExpertConfig(**FAST),
                     checkpoint_every=2)
    monkeypatch.undo()
    assert (tmp_path / ".e.checkpoint").exists()
    out = train_expert(llama, "toy", examples, [], tmp_path / "e",
                       ExpertConfig(**{**FAST, "lr": 2e-2}), checkpoint_every=2)
    assert load_metadata(out)["metrics"]["resumed_from_step"] == 0
    assert not (tmp_path / ".e.checkpoint").exists()


def test_length_windows_see_every_example_once_per_epoch_and_pad_less():
    lengths = [random.Random(i).randint(5, 200) for i in range(96)]
    data = [Encoded([0] * n, [0] * n) for n in lengths]

    def epoch(window: int) -> list[list[Encoded]]:
        stream = batches(data, 8, seed=3, window=window)
        return [next(stream) for _ in range(len(data) // 8)]

    def padded(bs: list[list[Encoded]]) -> int:
        return sum(8 * max(len(e.input_ids) for e in b) for b in bs)

    for window in (1, 4):
        seen = sorted(id(e) for b in epoch(window) for e in b)
        assert seen == sorted(id(e) for e in data)  # each example exactly once per epoch
    assert padded(epoch(4)) < 0.8 * padded(epoch(1))
    assert epoch(4) == epoch(4)  # deterministic from the seed


def test_attention_backpropagated_in_bf16_on_cpu_runs_in_fp32(llama):
    """torch's bf16 flash-attention backward is slow on CPU: under bf16 autocast with gradients
    on, ``sdpa_fp32_backward`` computes attention in fp32 and rounds its output once; without
    gradients (evaluation) it is the plain bf16 call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = llama.model.model.layers[0].self_attn
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    exact = sdpa_attention_forward(module, q, k, v, None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sdpa_attention_forward(module, q, k, v, None)[0]
        trained = loop.sdpa_fp32_backward(module, q, k, v, None)[0]
        with torch.no_grad():
            evaluated = loop.sdpa_fp32_backward(module, q, k, v, None)[0]
    assert trained.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(trained, exact.bfloat16())  # fp32 attention, rounded once
    assert not torch.equal(plain, trained)  # bf16 attention differs
    assert torch.equal(evaluated, plain)
    assert torch.equal(loop.sdpa_fp32_backward(module, q, k, v, None)[0], exact)  # fp32: as is
    # a float mask made under autocast (T5 adds its position bias to it) is upcast as well
    bias = torch.randn(2, 1, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        biased = loop.sdpa_fp32_backward(module, q, k, v, bias)[0]
    assert torch.equal(biased, sdpa_attention_forward(module, q, k, v, bias.float())[0].bfloat16())


@pytest.mark.parametrize("bf16, faster", [(False, True), (True, False), (None, True),
                                          (None, False)])
def test_bf16_training_on_cpu_switches_attention_and_switches_it_back(
        llama, tmp_path, monkeypatch, bf16, faster):
    """bf16 None: bf16 where it is faster (here: as patched). The metadata says what ran."""
    monkeypatch.setattr("phatgoose.models.base.bf16_is_faster", lambda device: faster)
    seen = []
    attention = llama.model.model.layers[0].self_attn
    hook = attention.register_forward_hook(
        lambda m, *_: seen.append((m.config._attn_implementation, torch.is_grad_enabled(),
                                   torch.is_autocast_enabled("cpu"))))
    out = train_expert(llama, "toy", toy_examples(8), toy_examples(4, seed=8), tmp_path / "e",
                       ExpertConfig(steps=2, batch_size=4, eval_every=2, bf16=bf16))
    hook.remove()
    ran_bf16 = faster if bf16 is None else bf16
    during = loop.FP32_BACKWARD_SDPA if ran_bf16 else "sdpa"
    # training steps and validation, under autocast exactly when bf16 ran
    assert set(seen) == {(during, True, ran_bf16), (during, False, ran_bf16)}
    assert llama.model.config._attn_implementation == "sdpa"
    assert load_metadata(out)["config"]["bf16"] is ran_bf16


def test_bf16_training_runs_on_causal_and_seq2seq_models(base, tmp_path):
    """T5 passes attention a float mask holding its position bias: upcast with the rest."""
    out = train_expert(base, "toy", toy_examples(8), toy_examples(4, seed=8), tmp_path / "e",
                       ExpertConfig(steps=2, batch_size=4, eval_every=2, bf16=True))
    meta = load_metadata(out)
    assert meta["config"]["bf16"] is True and meta["metrics"]["best_val_loss"] < 100
    assert base.model.config._attn_implementation == "sdpa"

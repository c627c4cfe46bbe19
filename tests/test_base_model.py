"""Loading a base model: where it runs (``device``) and the errors for what cannot be had."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import phatgoose.models.base as models_base
from phatgoose.errors import ModelError
from phatgoose.models.base import (
    bf16_is_faster,
    device_name,
    load_base_model,
    resolve_bf16,
    resolve_device,
)


def test_auto_picks_the_gpu_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_unusable_devices_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="torch sees no GPU: use auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelError, match="sees 1 GPU"):
        resolve_device("cuda:1")


def test_load_base_model_puts_the_model_on_the_device(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = load_base_model(str(model_dir), device="cpu")
    assert {p.device for p in base.model.parameters()} == {torch.device("cpu")}
    assert not any(p.requires_grad for p in base.model.parameters())
    assert base.fingerprint == load_base_model(str(model_dir), device="auto").fingerprint
    with pytest.raises(ModelError, match="cannot load base model"):
        load_base_model(str(tmp_path / "missing"))


def test_device_name_names_the_processor(monkeypatch):
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                 if line.startswith("model name"))
    assert device_name(torch.device("cpu")) == f"cpu ({model})"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    assert device_name(torch.device("cuda", 0)) == "cuda (NVIDIA H100 80GB HBM3)"


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(True, False), (False, True), (True, True),
                                                  (False, False)])
def test_bf16_is_the_default_where_it_is_faster(monkeypatch, amx, avx512_bf16):
    """Unset, bf16 autocast runs on CPUs with AMX tiles or AVX512-BF16 and on GPUs with bf16;
    elsewhere fp32. (``bf16_is_faster`` here is the real one: conftest pins the tests' default
    to fp32.)"""
    cpu, native = torch.device("cpu"), amx or avx512_bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert bf16_is_faster(cpu) is native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: amx)
    assert bf16_is_faster(torch.device("cuda")) is amx
    assert bf16_is_faster(torch.device("meta")) is False
    monkeypatch.setattr(models_base, "bf16_is_faster", bf16_is_faster)
    assert resolve_bf16(None, cpu) is native
    assert resolve_bf16(True, cpu) is True and resolve_bf16(False, cpu) is False

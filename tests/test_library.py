"""Library build / add / list / verify, PEFT round trips and every bad input on disk."""

import hashlib
import os
import pickle
import stat

import pytest
import torch
from conftest import random_expert, tiny_gpt2, tiny_llama
from peft import PeftModel

from phatgoose.errors import LibraryError, ModelError
from phatgoose.library import ExpertLibrary
from phatgoose.library.expert import (
    stack_experts,
    write_atomically,
    write_dir_atomically,
    write_json,
    write_text,
)
from phatgoose.models.base import wrap_model
from phatgoose.routing import RoutedLinear, route, unroute


def tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_add_list_verify_and_post_hoc_add(base, tmp_path):
    dirs = [random_expert(base, tmp_path / f"e{i}", seed=i) for i in range(3)]
    lib = ExpertLibrary.build(tmp_path / "lib", dirs[:2])
    assert lib.names == ["e0", "e1"]
    assert lib.verify() == []
    before = tree_digest(tmp_path / "lib" / "experts")
    assert ExpertLibrary(tmp_path / "lib").add(dirs[2]) == "e2"
    after = tree_digest(tmp_path / "lib" / "experts")
    assert {k: v for k, v in after.items() if k.startswith(("e0", "e1"))} == before
    assert ExpertLibrary(tmp_path / "lib").names == ["e0", "e1", "e2"]
    with pytest.raises(LibraryError, match="already has an expert named 'e2'"):
        ExpertLibrary(tmp_path / "lib").add(dirs[2])


def test_one_expert_top1_reproduces_the_expert_and_peft_round_trip(base, tmp_path):
    """A one-expert library routed top-1 gives the expert's own outputs, as PEFT loads it."""
    expert = random_expert(base, tmp_path / "solo", seed=3)
    lib = ExpertLibrary.build(tmp_path / "lib", [expert])
    ids = torch.randint(2, 100, (2, 9))
    inputs = {"input_ids": ids}
    if base.is_seq2seq:
        inputs["decoder_input_ids"] = torch.randint(2, 100, (2, 5))
    plain = base.model(**inputs).logits
    route(base.model, lib, top_k=1)
    routed = base.model(**inputs).logits
    unroute(base.model)
    torch.testing.assert_close(base.model(**inputs).logits, plain)  # unroute restores the base
    peft = PeftModel.from_pretrained(base.model, lib.expert_dir("solo"))
    expected = peft(**inputs).logits
    peft.unload()
    assert not torch.allclose(routed, plain, atol=1e-3)  # the expert changes the outputs
    # fp32, relative to the logits' scale (the sparse path sums in another order than PEFT)
    torch.testing.assert_close(routed, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_fingerprint_mismatch_is_refused(tokenizer, tmp_path):
    a = wrap_model(tiny_llama(len(tokenizer), seed=0), tokenizer, "llama-a")
    b = wrap_model(tiny_llama(len(tokenizer), seed=1), tokenizer, "llama-b")
    lib = ExpertLibrary.build(tmp_path / "lib", [random_expert(a, tmp_path / "ea", seed=0)])
    with pytest.raises(LibraryError, match="trained on base model 'llama-b'"):
        lib.add(random_expert(b, tmp_path / "eb", seed=0))
    with pytest.raises(ModelError, match="differ from the base model"):
        route(b.model, lib)
    assert not any(isinstance(m, RoutedLinear) for m in b.model.modules())


def test_experts_that_do_not_fit_the_model(tokenizer, tmp_path):
    llama = wrap_model(tiny_llama(len(tokenizer)), tokenizer, "llama")
    gpt2 = wrap_model(tiny_gpt2(len(tokenizer)), tokenizer, "gpt2")
    lib = ExpertLibrary.build(tmp_path / "lib", [random_expert(llama, tmp_path / "e", seed=0)])
    with pytest.raises(ModelError, match="does not have: they were trained on another"):
        route(gpt2.model, lib, check_fingerprint=False)


def test_pickled_weights_are_refused(llama, tmp_path):
    expert = random_expert(llama, tmp_path / "e", seed=0)
    (expert / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(LibraryError, match="not a valid safetensors file"):
        ExpertLibrary.build(tmp_path / "lib", [expert])
    (expert / "adapter_model.safetensors").unlink()
    torch.save({}, expert / "adapter_model.bin")
    with pytest.raises(LibraryError, match="adapter_model.bin \\(a pickle\\)"):
        ExpertLibrary.build(tmp_path / "lib2", [expert])


def test_corrupt_manifest_and_missing_gate(llama, tmp_path):
    lib = ExpertLibrary.build(tmp_path / "lib", [random_expert(llama, tmp_path / "e", seed=0)])
    (lib.expert_dir("e") / "gates.safetensors").unlink()
    assert "train the gate first" in lib.verify()[0]
    with pytest.raises(LibraryError, match="train the gate first"):
        route(llama.model, lib)
    assert not any(isinstance(m, RoutedLinear) for m in llama.model.modules())
    (tmp_path / "lib" / "manifest.json").write_text("{not json")
    with pytest.raises(LibraryError, match="is not valid JSON"):
        ExpertLibrary(tmp_path / "lib")
    with pytest.raises(LibraryError, match="is not an expert library"):
        ExpertLibrary(tmp_path)


def test_files_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "old\n")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half_then_crash)
    assert path.read_text() == "old\n"  # the previous version survives, whole
    write_json(tmp_path / "m.json", {"b": 1, "a": [2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    write_dir_atomically(tmp_path / "lib", lambda folder: (folder / "x").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "m.json", "report.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as a plain create makes them
    assert stat.S_IMODE((tmp_path / "lib").stat().st_mode) == 0o777 & ~umask


def test_the_umask_is_read_without_being_changed(tmp_path, monkeypatch):
    """On Linux the umask comes from /proc/self/status: os.umask, which sets it to 0 and back,
    is never called (a file another thread created in between would be world-writable)."""
    previous = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        write_text(tmp_path / "a.txt", "a")
        write_dir_atomically(tmp_path / "d", lambda folder: None)
        monkeypatch.undo()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


def test_gpt2_conv1d_modules_are_routed(tokenizer, tmp_path):
    gpt2 = wrap_model(tiny_gpt2(len(tokenizer)), tokenizer, "gpt2")
    lib = ExpertLibrary.build(tmp_path / "lib", [random_expert(gpt2, tmp_path / "e", seed=0)])
    ids = torch.randint(2, 100, (1, 6))
    peft = PeftModel.from_pretrained(gpt2.model, lib.expert_dir("e"))
    expected = peft(input_ids=ids).logits
    peft.unload()
    route(gpt2.model, lib, method="single:e")
    assert len([m for m in gpt2.model.modules() if isinstance(m, RoutedLinear)]) == 2 * 4
    torch.testing.assert_close(gpt2.model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_bad_expert_leaves_no_library_behind(llama, tmp_path):
    good = random_expert(llama, tmp_path / "good", seed=0)
    bad = random_expert(llama, tmp_path / "bad", seed=1)
    (bad / "gates.safetensors").unlink()
    with pytest.raises(LibraryError, match="train the gate first"):
        ExpertLibrary.build(tmp_path / "lib", [good, bad])
    assert not (tmp_path / "lib").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    ExpertLibrary.build(tmp_path / "lib", [good])
    with pytest.raises(LibraryError, match="exists and is not empty"):
        ExpertLibrary.build(tmp_path / "lib", [good])


def test_stacked_experts_are_cached_once_per_library_state(llama, tmp_path):
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i) for i in range(3)]
    library = ExpertLibrary.build(tmp_path / "lib", dirs[:2])
    ids = torch.randint(0, 100, (2, 7))
    fresh = library.stacked(library.names[:1])  # a subset: stacked, never cached
    assert not (library.root / "stacks").exists()
    lora = library.lora(library.names[0])
    module = sorted(lora)[0]
    w = lora[module]
    assert torch.allclose(fresh[f"{module}.lora_A"][0], w.A)
    assert torch.allclose(fresh[f"{module}.lora_B"][0], (w.B * w.scaling).T)
    assert torch.equal(fresh[f"{module}.gate"][0], library.gates(library.names[0])[module])

    built = library.stacked()  # the whole library: built and cached
    (cache,) = (library.root / "stacks").iterdir()
    cached = library.stacked()  # read back from the cache
    assert sorted(cached) == sorted(built)
    assert all(torch.equal(cached[k], built[k]) for k in built)
    route(llama.model, library, top_k=1)
    expected = llama.model(input_ids=ids).logits
    unroute(llama.model)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a safetensors file")
    os.replace(garbage, cache)  # a damaged cache is rebuilt, not trusted
    route(llama.model, library, top_k=1)
    torch.testing.assert_close(llama.model(input_ids=ids).logits, expected, rtol=0, atol=0)
    unroute(llama.model)
    assert cache.stat().st_size > 100

    library.add(dirs[2])  # a new expert: a new key, and the stale stack is removed
    assert library.stacked()[f"{module}.lora_A"].shape[0] == 3
    (new_cache,) = (library.root / "stacks").iterdir()
    assert new_cache.name != cache.name


def test_stacking_expert_by_expert_equals_stack_experts_with_mixed_ranks(llama, tmp_path):
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i, rank=r)
            for i, r in enumerate([2, 4, 3])]
    library = ExpertLibrary.build(tmp_path / "lib", dirs)
    stacks = library.stacked()
    loras = [library.lora(n) for n in library.names]
    for module in loras[0]:
        A, B = stack_experts([lora[module] for lora in loras])
        assert stacks[f"{module}.lora_A"].shape == (3, 4, A.shape[2])
        torch.testing.assert_close(stacks[f"{module}.lora_A"], A, rtol=0, atol=0)
        torch.testing.assert_close(stacks[f"{module}.lora_B"], B, rtol=1e-6, atol=0)

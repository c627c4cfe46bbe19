"""Tiny random models and a tiny tokenizer, built in the tests (no download)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the fused routing kernel (Triton) runs on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from phatgoose.data.tasks import Example
from phatgoose.library.expert import LoraWeights
from phatgoose.models.base import wrap_model

CORPUS = [
    "The color red is warm. Answer: yes no maybe red green blue",
    "Convert 3 meters to centimeters. Answer: 300 cm",
    "Is this argument a fallacy? Answer: valid invalid",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-\n",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(autouse=True)
def fp32_where_bf16_is_unset():
    """A ``bf16`` setting left unset runs bf16 on CPUs with AMX or AVX512-BF16: the tests pin
    fp32 there, so that they compute the same on every machine (tests of bf16 ask for it, or
    patch this).
    Its own MonkeyPatch: a test's ``monkeypatch.undo()`` leaves it in place."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("phatgoose.models.base.bf16_is_faster", lambda device: False)
        yield


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tiny_t5(vocab: int, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config)


def tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return GPT2LMHeadModel(config)


BUILDERS = {"llama": tiny_llama, "t5": tiny_t5, "gpt2": tiny_gpt2}


@pytest.fixture(params=["llama", "t5"])
def base(request, tokenizer):
    """A tiny random causal (Llama) or seq2seq (T5) base model, frozen, with its tokenizer."""
    model = BUILDERS[request.param](len(tokenizer))
    return wrap_model(model, tokenizer, f"tiny-{request.param}")


@pytest.fixture
def llama(tokenizer):
    return wrap_model(tiny_llama(len(tokenizer)), tokenizer, "tiny-llama")


def toy_examples(n: int = 24, seed: int = 0) -> list[Example]:
    """A learnable multiple-choice toy task: answer 'red' for even numbers, 'blue' for odd."""
    return [
        Example(input=f"Number {i + seed}: color?", targets=("red" if (i + seed) % 2 == 0
                else "blue",), choices=("red", "blue"))
        for i in range(n)
    ]


def random_loras(d_in: int, d_out: int, ranks: list[int]) -> list[LoraWeights]:
    """Random LoRA experts for one d_in -> d_out layer, of these ranks, scalings 0.5, 1.5, ..."""
    return [LoraWeights(torch.randn(r, d_in), torch.randn(d_out, r), 0.5 + i)
            for i, r in enumerate(ranks)]


def random_expert(base, out, seed: int, task: str | None = None, rank: int = 4):
    """A real PEFT LoRA adapter directory with random (non-zero) A and B, random gates, and
    phatgoose metadata: what a trained expert looks like, without training."""
    from peft import LoraConfig, get_peft_model

    from phatgoose.library.expert import EXPERT_META, GATES, write_json, write_safetensors
    from phatgoose.models import resolve_target_modules

    torch.manual_seed(seed)
    targets = resolve_target_modules(base.model)
    peft_model = get_peft_model(base.model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                       target_modules=targets))
    gates = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
            if "lora_A" in name:
                module = name.removeprefix("base_model.model.").split(".lora_A")[0]
                gates[module] = torch.randn(p.shape[1])
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    peft_model.unload()
    write_safetensors(out / GATES, gates)
    write_json(out / EXPERT_META, {"task": task or out.name, "base_model": base.name,
                                   "base_fingerprint": base.fingerprint, "metrics": {}})
    return out

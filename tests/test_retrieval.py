"""Retrieval with the real all-MiniLM-L6-v2 (shipped in a PyPI package, loaded offline)."""

import json

import pytest
from conftest import random_expert

from phatgoose.data.tasks import Example
from phatgoose.eval import EvalConfig
from phatgoose.library import ExpertLibrary
from phatgoose.pipeline import evaluate_methods
from phatgoose.routing.retrieval import (
    RETRIEVAL_EMBEDDINGS,
    load_encoder,
    retrieval_text,
    retrieve,
    store_retrieval_embeddings,
)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def arithmetic(n):
    return [Example(f"What is {i} plus {i + 3}?", (str(2 * i + 3),), (str(2 * i + 3), "7"))
            for i in range(n)]


def fruit(n):
    names = ["apple", "banana", "lemon", "cherry", "grape", "lime", "plum", "pear"]
    return [Example(f"Which color is a ripe {names[i % 8]}?", ("red",), ("red", "yellow"))
            for i in range(n)]


def test_text_format():
    e = Example("Is it?", ("yes",), ("yes", "no"))
    assert retrieval_text(e) == "Answer Choices: yes | no, Instance: Is it?"


def test_nearest_neighbour_picks_the_owner_and_is_stored_once(llama, tmp_path, encoder):
    dirs = [random_expert(llama, tmp_path / name, seed=i) for i, name in
            enumerate(["math", "fruit"])]
    library = ExpertLibrary.build(tmp_path / "lib", dirs)
    data = {"math": arithmetic(20), "fruit": fruit(20)}
    with pytest.raises(Exception, match="no retrieval index"):
        retrieve(library, arithmetic(2), encoder=encoder)
    assert store_retrieval_embeddings(library, data, encoder=encoder) == ["math", "fruit"]
    assert store_retrieval_embeddings(library, data, encoder=encoder) == []
    assert (library.expert_dir("math") / RETRIEVAL_EMBEDDINGS).exists()
    queries = [Example("What is 40 plus 43?", ("83",), ("83", "7")),
               Example("Which color is a ripe mango?", ("yellow",), ("red", "yellow"))]
    assert retrieve(library, queries, encoder=encoder) == ["math", "fruit"]

    # evaluating with retrieval = evaluating each example with its retrieved expert alone
    sets = {"mixed": queries}
    rows = evaluate_methods(llama, library, sets, ["retrieval", "single:math", "single:fruit"],
                            EvalConfig(), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "predictions-retrieval.jsonl").read_text()
             .splitlines()]
    assert [x["expert"] for x in lines] == ["math", "fruit"]
    singles = {m: [json.loads(x) for x in (tmp_path / f"predictions-single_{m}.jsonl")
                   .read_text().splitlines()] for m in ("math", "fruit")}
    assert lines[0]["nll"] == singles["math"][0]["nll"]
    assert lines[1]["nll"] == singles["fruit"][1]["nll"]
    expected = (singles["math"][0]["correct"] + singles["fruit"][1]["correct"]) / 2
    assert rows["retrieval"]["tasks"]["mixed"]["accuracy"] == expected

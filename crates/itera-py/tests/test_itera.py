"""The Python package against the runtime and the CLI (run by crates/itera-cli/tests/python_package.rs,
which builds the wheel into a test venv; ITERA_MODEL and ITERA_BIN point at the shipped model and
the `itera` binary)."""

import json
import os
import subprocess
import threading

import numpy as np
import pytest

import itera
from itera import IteraError, Model, generate_text, load_model

MODEL = os.environ["ITERA_MODEL"]
BIN = os.environ["ITERA_BIN"]
with open(os.path.join(MODEL, "config.json")) as f:
    CONFIG = json.load(f)
VOCAB = CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def model():
    return Model.load(MODEL)


def cli_text(*args):
    out = subprocess.run([BIN, "generate", "--model", MODEL, "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"]


def test_the_original_api(model):
    m, config = load_model(MODEL)
    assert config["preset"] == CONFIG["preset"] and config["vocab_size"] == VOCAB
    assert config["n_layers"] == CONFIG["n_layers"] and config["moe_layers"] == CONFIG["moe_layers"]
    text = generate_text(m, prompt="Once upon a time", max_length=20)
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


def test_generation_is_seeded_and_equals_the_cli(model):
    a = model.generate("It was a", max_tokens=30, seed=7)
    assert a == model.generate("It was a", max_tokens=30, seed=7)
    assert a != model.generate("It was a", max_tokens=30, seed=8)
    assert a == cli_text("--prompt", "It was a", "--max-tokens", "30", "--seed", "7")
    greedy = model.generate("It was a", max_tokens=30, temperature=0)
    assert greedy == cli_text("--prompt", "It was a", "--max-tokens", "30", "--temperature", "0")
    penalised = model.generate("It was a", max_tokens=30, temperature=0, repetition_penalty=1.3)
    assert penalised == cli_text("--prompt", "It was a", "--max-tokens", "30", "--temperature", "0",
                                 "--repetition-penalty", "1.3")


def test_stream_pieces_join_to_the_generated_text(model):
    pieces = list(model.stream("The king", max_tokens=40, seed=3))
    assert len(pieces) > 5
    assert "".join(pieces) == model.generate("The king", max_tokens=40, seed=3)


def test_stop_strings_cut_the_text(model):
    full = model.generate("It was", max_tokens=60, temperature=0)
    word = full.split()[3]
    cut = model.generate("It was", max_tokens=60, temperature=0, stop=[word])
    assert cut == full[:full.index(word)]


def test_logits_are_the_runtime_s(model):
    text = "It is a truth universally acknowledged.\n"
    ids = model.tokenizer.encode("\n") + model.tokenizer.encode(text)
    logits = model.logits(ids)
    assert logits.shape == (len(ids), VOCAB) and logits.dtype == np.float32
    # Each position's log-softmax scores the next token as `eval` does (conditioned on "\n").
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)) + x.max(axis=1)
    nll = (lse - x[np.arange(len(ids) - 1), ids[1:]]).sum()
    report = model.eval(text)
    assert report["tokens"] == len(ids) - 1
    assert abs(nll - report["mean_nll"] * report["tokens"]) < 1e-3
    # A prefix gives the same rows, and greedy decoding follows the argmax of the logits of the
    # prompt alone (generation does not condition on a leading "\n" as `eval` does).
    assert np.allclose(model.logits(ids[:3]), logits[:3], atol=1e-5)
    prompt_logits = model.logits(model.tokenizer.encode(text))
    first = model.tokenizer.decode([int(np.argmax(prompt_logits[-1]))])
    assert model.generate(text, max_tokens=1, temperature=0) == first


def test_tokenizer_round_trips(model):
    ids = model.tokenizer.encode("naïve café — ok")
    assert model.tokenizer.decode(ids) == "naïve café — ok"
    assert model.tokenizer.vocab_size == VOCAB
    with pytest.raises(IteraError, match="out of range"):
        model.tokenizer.decode([10**6])


def test_saved_state_continues_exactly(model, tmp_path):
    whole = model.generate("It was a", max_tokens=40, seed=11)
    first = model.generate("It was a", max_tokens=20, seed=11)
    model.save_state(tmp_path / "s.safetensors")
    model.load_state(tmp_path / "s.safetensors")
    second = model.generate("", max_tokens=20, seed=99)
    assert first + second == whole


def test_bad_input_raises_with_the_cli_message(tmp_path):
    with pytest.raises(IteraError, match="no such model"):
        Model.load(tmp_path / "missing")
    with pytest.raises(IteraError, match="prompt is empty"):
        Model.load(MODEL).generate("")
    with pytest.raises(IteraError, match="temperature must be in"):
        Model.load(MODEL).generate("x", temperature=-1)
    with pytest.raises(TypeError, match="unknown sampling"):
        Model.load(MODEL).generate("x", temprature=1)


def test_generation_releases_the_gil(model):
    # While a long generation runs in a thread, this thread keeps running Python.
    done = []
    t = threading.Thread(target=lambda: done.append(model.generate("It", max_tokens=400, seed=1)))
    t.start()
    ticks = 0
    while t.is_alive():
        ticks += 1
    t.join()
    assert done and ticks > 1000


def test_placeholders_are_generated_only_when_allowed():
    ptb = Model.load(os.path.join(os.path.dirname(MODEL), "ptb-tiny"))
    allowed = ptb.generate("the company said", max_tokens=200, seed=2, allow_placeholders=True)
    assert "<unk>" in allowed
    assert "<unk>" not in ptb.generate("the company said", max_tokens=200, seed=2)

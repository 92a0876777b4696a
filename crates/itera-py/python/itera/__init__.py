"""Itera-Lite from Python: small selective-SSM + MoE language models on a CPU.

    from itera import load_model, generate_text
    model, config = load_model("models/itera-lite-tiny")
    print(generate_text(model, prompt="Once upon a time", max_length=100))

or the class API:

    from itera import Model
    m = Model.load("models/itera-lite-tiny")          # a model directory or a .gguf file
    text = m.generate("It was", max_tokens=50, temperature=0.8, seed=42)
    for piece in m.stream("It was", max_tokens=50): print(piece, end="")
    m.eval("Some held-out text.\\n")                     # bits per byte, perplexity, ...
    m.logits(m.tokenizer.encode("It was"))             # numpy [tokens, vocab]

Generation releases the GIL. Errors raise `itera.IteraError` with the CLI's messages.
"""

import json
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union
import os

import numpy as np

from ._native import IteraError, NativeModel, NativeStream

__all__ = ["Model", "Stream", "Tokenizer", "IteraError", "load_model", "generate_text"]

PathLike = Union[str, "os.PathLike[str]"]

# The CLI's defaults (`itera generate --help`), so the same seed gives the same text.
_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, seed=42, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
                 allow_placeholders=False)


class Tokenizer:
    """The model's byte-level BPE tokenizer."""

    def __init__(self, native: NativeModel):
        self._native = native

    def encode(self, text: str) -> List[int]:
        return self._native.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._native.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size()


class Stream:
    """An iterator of generated text pieces; `Model.save_state(path, stream)` saves where it is."""

    def __init__(self, native: NativeStream):
        self._native = native

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        piece = self._native.__next__()
        if piece is None:
            raise StopIteration
        return piece


class Model:
    """A loaded model (a model directory or a .gguf file)."""

    def __init__(self, native: NativeModel):
        self._native = native
        self.config: Dict = json.loads(native.config_json())
        self.tokenizer = Tokenizer(native)

    @classmethod
    def load(cls, path: PathLike) -> "Model":
        return cls(NativeModel.load(os.fspath(path)))

    @property
    def parameters(self) -> int:
        return self._native.parameter_count()

    def _sampling(self, kw: Dict) -> Dict:
        unknown = set(kw) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        return {**_DEFAULTS, **kw}

    def generate(self, prompt: str, max_tokens: int = 100, stop: Optional[Sequence[str]] = None,
                 **sampling) -> str:
        """The text generated after `prompt` (without it), cut before the first `stop` string.
        Sampling: temperature (0 = greedy), top_k, top_p, seed, repetition_penalty,
        presence_penalty, frequency_penalty, min_p, allow_placeholders (PTB's `<unk>` is never
        generated unless True, as in `itera generate --allow-unk`)."""
        s = self._sampling(sampling)
        return self._native.generate(prompt, max_tokens, s["temperature"], s["top_k"], s["top_p"],
                                     s["seed"], list(stop or []), s["repetition_penalty"],
                                     s["presence_penalty"], s["frequency_penalty"], s["min_p"],
                                     s["allow_placeholders"])

    def stream(self, prompt: str, max_tokens: int = 100, **sampling) -> Stream:
        """Like `generate`, as an iterator of text pieces."""
        s = self._sampling(sampling)
        return Stream(self._native.stream(prompt, max_tokens, s["temperature"], s["top_k"], s["top_p"],
                                          s["seed"], s["repetition_penalty"], s["presence_penalty"],
                                          s["frequency_penalty"], s["min_p"],
                                          s["allow_placeholders"]))

    def eval(self, text: str) -> Dict:
        """Scores `text` as `itera eval` does: bits_per_byte, perplexity, mean_nll, counts."""
        return self._native.eval(text)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """The next-token logits after each of `token_ids` (from a fresh state): [len, vocab]."""
        raw, rows, vocab = self._native.logits([int(t) for t in token_ids])
        return np.frombuffer(raw, dtype="<f4").reshape(rows, vocab).copy()

    def save_state(self, path: PathLike, stream: Optional[Stream] = None) -> None:
        """Saves the recurrent state (and sampler) the last `generate` ended in, or `stream`'s."""
        self._native.save_state(os.fspath(path), stream._native if stream else None)

    def load_state(self, path: PathLike) -> None:
        """Loads a saved state: the next `generate` / `stream` continues exactly from it."""
        self._native.load_state(os.fspath(path))


def load_model(path: PathLike) -> Tuple[Model, Dict]:
    """The original Itera-Lite's entry point: `model, config = load_model(path)`."""
    model = Model.load(path)
    return model, model.config


def generate_text(model: Model, prompt: str, max_length: int = 100, temperature: float = 0.8,
                  **sampling) -> str:
    """The original Itera-Lite's `generate_text`: the prompt followed by up to `max_length`
    generated tokens."""
    return prompt + model.generate(prompt, max_tokens=max_length, temperature=temperature, **sampling)

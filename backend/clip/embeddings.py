"""Embeddings out: POST /embeddings read and checked at the door, and embeddings written into answers.

The text endpoint follows OpenAI's /v1/embeddings shape, which Infinity serves too:
{"input": "text" | ["text", …], "encoding_format": "float" | "base64"} ->
{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": […]}], "model": …, "usage": …}.
`model`, `user` and any other key are accepted and ignored (one model serves here: the answer names it);
`dimensions` is taken only when it is the model's own. Numbers are each float32 value written with the 9
significant digits that give it back exactly; base64 is the little-endian float32 bytes, as OpenAI's."""

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ClientError
from .options import OptionRules
from .request import json_object

ENCODINGS = ("float", "base64")
EXAMPLE = '{"input": ["a photo of a cat"]}'


@dataclass(frozen=True)
class TextRequest:
    """What a POST /embeddings asks, checked: the texts, in order, and how to write their embeddings."""

    texts: tuple[str, ...]
    encoding: str = "float"


def parse_text_request(body: bytes, rules: OptionRules, width: int) -> TextRequest:
    """The texts to embed: as many as CLIP_MAX_LABELS, each of 1 to CLIP_MAX_LABEL_CHARS characters (the
    limits of a request's own labels, which are encoded the same way); a ClientError for anything else."""
    doc = json_object(body, EXAMPLE)
    if "input" not in doc:
        raise ClientError(400, "invalid_input", f"The body must hold input, a string or a list of strings: {EXAMPLE}.")
    texts = [doc["input"]] if isinstance(doc["input"], str) else doc["input"]
    if not isinstance(texts, list) or not texts:
        raise ClientError(400, "invalid_input", "input must be a string or a non-empty list of strings.")
    if len(texts) > rules.max_labels:
        raise ClientError(400, "too_many_inputs", f"{len(texts)} texts sent; at most {rules.max_labels} per request.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ClientError(400, "invalid_input", f"input[{i}] is not a non-empty string (token ids are not taken).")
        if len(text) > rules.max_label_chars:
            raise ClientError(
                400, "invalid_input", f"input[{i}] has {len(text)} characters; at most {rules.max_label_chars}."
            )
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise ClientError(400, "invalid_option", "encoding_format must be float or base64.")
    dimensions = doc.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions != width):
        raise ClientError(
            400, "invalid_option", f"This model's embeddings have {width} dimensions: dimensions must be {width}."
        )
    return TextRequest(tuple(texts), encoding)


def as_floats(row: np.ndarray) -> list[float]:
    """A float32 embedding as JSON numbers: 9 significant digits give each float32 back exactly, in about
    two thirds of the characters of the double it converts to."""
    return [float(format(value, ".9g")) for value in np.asarray(row, np.float32).tolist()]


def encoded(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(row, "<f4").tobytes()).decode("ascii")
    return as_floats(row)


def text_answer(rows: np.ndarray, request: TextRequest, tokens: int, about: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's list of embeddings; `about`: the model, its weights and the dtype they were computed in."""
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(row, request.encoding)} for i, row in enumerate(rows)
    ]
    return {"object": "list", "data": data, **about, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

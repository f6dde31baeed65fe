"""The contract as a spec: each function's OpenAPI 3.1 document (backend/clip/openapi.json,
frontend/index/openapi.json) is valid, names every error code the code can answer with its status, is
served at GET /function/<name>/openapi.json, and holds against the running functions when schemathesis,
an API fuzzer nobody here wrote, throws its cases at them: no 5xx, every answer of a documented status
and shape."""

import json
import pathlib
import re

import observe
import pytest
import requests
import schemathesis
from clip import errors as clip_errors
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = {"clip": ROOT / "backend/clip/openapi.json", "index": ROOT / "frontend/index/openapi.json"}
SOURCES = {
    "clip": sorted((ROOT / "backend/clip").glob("*.py")),
    "index": sorted((ROOT / "frontend/index").glob("*.py")),
    "host": [],
}
# A call that refuses: ClientError(400, "invalid_image", …), Refused(400, "too_many_parts", …),
# _failure(504, "clip_timeout", …), json_error(500, "internal_error", …): every
# status written in its first argument, and its code.
REFUSAL = re.compile(r"\b(?:ClientError|Refused|_failure|json_error)\(\s*([^\"()]*?),\s*(?:#[^\n]*\s*)?\"(\w+)\"")
# A decoder's refusal names a code only (BadImage("invalid_image", …)): its status is clip's catalogue's.
DECODER_REFUSAL = re.compile(r"\bBadImage\(\s*\"(\w+)\"")
# An error answer written out whole: _json(405, {"error": {"code": "method_not_allowed", …
# or {"statusCode": 500, "body": {"error": {"code": "internal_error"}}}
LITERAL = re.compile(r"(\d{3}),\s*(?:\"body\":\s*)?\{\s*\"error\":\s*\{\s*\"code\":\s*\"(\w+)\"")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def answered_codes(part: str) -> set[tuple[int, str]]:
    """(status, code) for every error the sources of this part can answer."""
    found = set()
    for path in SOURCES[part]:
        text = path.read_text()
        for first, code in REFUSAL.findall(text):
            statuses = re.findall(r"\b\d{3}\b", first)
            assert statuses, f"{path.name}: a refusal with code {code} and no status literal ({first!r})"
            found |= {(int(status), code) for status in statuses}
        found |= {(int(status), code) for status, code in LITERAL.findall(text)}
        found |= {(clip_errors.status(code), code) for code in DECODER_REFUSAL.findall(text)}
    if part == "host":  # the host's own refusals and its 500: its catalogue (tests/test_error_catalogue.py)
        found |= {(status, code) for code, (status, _) in observe.HOST_ERRORS.items()}
    return found


def documented_codes(document: dict) -> set[tuple[int, str]]:
    """(status, code) for every error code a POST's answer may carry, by the document (clip's POST / and
    POST /embeddings alike)."""
    found = set()
    for operations in document["paths"].values():
        for status, response in operations.get("post", {}).get("responses", {}).items():
            schema = response["content"]["application/json"]["schema"]
            if int(status) >= 400:
                codes = schema["properties"]["error"]["properties"]["code"]["enum"]
                found |= {(int(status), code) for code in codes}
    return found


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_is_valid_openapi_3_1(name):
    document = json.loads(DOCUMENTS[name].read_text())
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on anything OpenAPI 3.1 does not allow


def test_source_scan_finds_the_known_refusals():
    """The scan below is only as good as its patterns: it finds refusals of each shape the sources use."""
    clip, index, host = answered_codes("clip"), answered_codes("index"), answered_codes("host")
    assert {(400, "invalid_image"), (413, "image_too_large"), (405, "method_not_allowed"), (503, "loading"),
            (504, "deadline_exceeded")} <= clip
    assert {(502, "clip_bad_answer"), (503, "clip_unavailable"), (504, "clip_timeout")} <= index
    assert {(405, "method_not_allowed"), (400, "too_many_parts")} <= index
    assert {(413, "body_too_large"), (500, "internal_error"), (431, "headers_too_large")} <= host


@pytest.mark.parametrize(
    ("name", "parts"), [("clip", ("clip", "host")), ("index", ("index", "clip", "host"))], ids=["clip", "index"]
)
def test_every_error_code_is_documented_with_its_status(name, parts):
    """Every code the sources can answer is in the document under its status (index passes clip's codes
    on with clip's status, all but those only clip's POST /embeddings answers), and the document names no
    code the sources never answer."""
    answered = set().union(*(answered_codes(part) for part in parts))
    if name == "index":
        answered = {(status, code) for status, code in answered if code not in clip_errors.EMBEDDINGS_ONLY}
    documented = documented_codes(json.loads(DOCUMENTS[name].read_text()))
    assert sorted(answered - documented) == [], "answered but not documented"
    assert sorted(documented - answered) == [], "documented but never answered"


# Tests that only list codes (as the catalogues do) reach none of them.
TESTS = [path for path in sorted((ROOT / "tests").rglob("*.py"))
         if path.name not in ("test_openapi.py", "test_error_catalogue.py")]
NOT_LOCAL = "x-not-produced-locally"  # on a response: {code: why the local stack cannot produce it}


def documented_answers(document):
    """(where, status, codes, response) for every answer the document names."""
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                codes = schema.get("properties", {}).get("error", {}).get("properties", {}).get("code", {})
                yield f"{method.upper()} {path} {status}", int(status), codes.get("enum", []), response


def exercised(status, code):
    """Some test asks for this answer: its file names the code and the status."""
    return any(f'"{code}"' in text and re.search(rf"\b{status}\b", text) for text in TEST_TEXTS)


TEST_TEXTS = [path.read_text() for path in TESTS]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_documented_status_is_reached_or_explained(name):
    """Every error answer a document names is produced by some test (the fuzz below reaches the 2xx ones
    through the documents' own examples), or the document says why the local stack cannot produce it
    (x-not-produced-locally: {code: why}); a note goes once a test produces its answer."""
    unreached, stale = [], []
    for where, status, codes, response in documented_answers(json.loads(DOCUMENTS[name].read_text())):
        notes = response.get(NOT_LOCAL, {})
        assert set(notes) <= set(codes) and all(isinstance(why, str) and why for why in notes.values()), where
        if status < 400:
            continue
        assert codes, f"{where}: an error answer without its codes"
        unreached += [f"{where} {code}" for code in codes if code not in notes and not exercised(status, code)]
        stale += [f"{where} {code}" for code in notes if exercised(status, code)]
    assert unreached == [], "documented, never produced by a test, and not explained"
    assert stale == [], "explained as not produced locally, yet a test produces it"


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_is_served(stack, name):
    for method in ("GET", "HEAD"):
        response = requests.request(method, f"{stack.url}/function/{name}/openapi.json", timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/json")
    assert requests.get(f"{stack.url}/function/{name}/openapi.json", timeout=10).json() == json.loads(
        DOCUMENTS[name].read_text()
    )


def _schema(name):
    """From the file; test_document_is_served holds that the functions serve this very document.
    (schemathesis.pytest.from_fixture, which would load it from the stack, fails under pytest 9.)"""
    schema = schemathesis.openapi.from_path(DOCUMENTS[name])
    schema.config.generation.update(max_examples=25)
    return schema


CLIP_SCHEMA, INDEX_SCHEMA = _schema("clip"), _schema("index")


def _no_imagenet(value):
    """imagenet1k's embeddings are 40 minutes of CPU that the stack does not preload: its 503
    label_set_warming is documented and held in test_labels; here it would only turn the fuzz into a
    build of 80,000 prompts on a shared machine."""
    if isinstance(value, dict):
        return {key: _no_imagenet(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_imagenet(item) for item in value]
    return "cifar10" if isinstance(value, str) and "imagenet1k" in value else value


def _fuzz(stack, name, case):
    case.query = _no_imagenet(case.query) if case.query else case.query
    case.body = _no_imagenet(case.body)
    case.call_and_validate(base_url=f"{stack.url}/function/{name}", checks=CHECKS, timeout=60)


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@CLIP_SCHEMA.parametrize()
@FUZZ
def test_clip_holds_to_its_document(stack, case):
    _fuzz(stack, "clip", case)


@INDEX_SCHEMA.parametrize()
@FUZZ
def test_index_holds_to_its_document(stack, case):
    _fuzz(stack, "index", case)

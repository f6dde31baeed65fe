"""One error catalogue: every code clip, index and the template host answer, with one status each, is in
docs/api.md's error table with that status and its meaning, and the table names no other; every refusal
written in the functions' sources uses its code's status; index passes on exactly clip's codes.

The catalogues: clip's backend/clip/errors.py CATALOGUE, index's frontend/index/errors.py CATALOGUE and
PASSED_ON, the host's observe.HOST_ERRORS (code -> (status, meaning))."""
import re
from pathlib import Path

import observe
import pytest
from clip import errors as clip_errors

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
SOURCES = {"clip": sorted((ROOT / "backend" / "clip").glob("*.py")),
           "index": sorted((ROOT / "frontend" / "index").glob("*.py"))}
# A refusal written with its status: ClientError(400, "invalid_image", …), index's Refused(…) and
# _failure(…), a status tuple (413, "body_too_large", …); a decoder's BadImage("invalid_image", …)
# names only a code, whose status is the catalogue's.
REFUSAL = re.compile(r"\b(?:ClientError|Refused|_failure|json_error)\(\s*(\d{3}),\s*(?:#[^\n]*\s*)?\"(\w+)\"")
CODE_ONLY = re.compile(r"\bBadImage\(\s*\"(\w+)\"")


def index_errors():
    try:
        from frontend.index import errors
    except ImportError as exc:  # index's catalogue is its own module (frontend/index/errors.py)
        pytest.skip(f"frontend/index/errors.py cannot be imported ({exc})")
    return errors


def catalogues():
    """{part: {code: (status, meaning)}}; index's passed-on codes under clip's status and meaning."""
    index = index_errors()
    passed_on = {code: clip_errors.CATALOGUE[code] for code in index.PASSED_ON if code in clip_errors.CATALOGUE}
    return {"clip": dict(clip_errors.CATALOGUE), "index": {**passed_on, **index.CATALOGUE},
            "host": dict(observe.HOST_ERRORS)}


def table():
    """{code: (status, answered by, meaning)} from docs/api.md's error table (| code | status | … |)."""
    rows, inside = {}, False
    for line in API.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:4] == ["code", "status", "answered by", "meaning"]:
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if inside and not set(cells[0]) <= set("-: "):
            code = cells[0].strip("`")
            assert code not in rows, f"docs/api.md lists {code} twice"
            rows[code] = (int(cells[1]), {who.strip() for who in cells[2].split(",")}, cells[3])
    assert rows, "docs/api.md has no error table (| code | status | answered by | meaning |)"
    return rows


def plain(text):
    """A meaning as the table writes it and as a catalogue does: backticks and a last full stop aside."""
    return text.replace("`", "").rstrip(".").strip()


def test_one_status_per_code_across_clip_index_and_the_host():
    statuses = {}
    for part, catalogue in catalogues().items():
        for code, (status, meaning) in catalogue.items():
            assert meaning and "\n" not in meaning, f"{part}: {code} has no one-line meaning"
            statuses.setdefault(code, set()).add(status)
    assert {code: found for code, found in statuses.items() if len(found) > 1} == {}
    assert statuses["too_many_parts"] == {400}


def test_index_passes_on_exactly_clips_codes():
    """All but those only clip's POST /embeddings answers: index forwards pictures to POST /, never texts."""
    assert clip_errors.EMBEDDINGS_ONLY < set(clip_errors.CATALOGUE)
    assert set(index_errors().PASSED_ON) == set(clip_errors.CATALOGUE) - clip_errors.EMBEDDINGS_ONLY


def test_the_handlers_error_codes_are_the_catalogues():
    """The closed label set of each function's request counter is its catalogue (clip's: its own codes)."""
    assert clip_errors.ERROR_CODES == frozenset(clip_errors.CATALOGUE)
    index = index_errors()
    assert index.ERROR_CODES == frozenset(index.CATALOGUE) | index.PASSED_ON


def test_every_code_of_the_catalogues_is_in_the_table_with_its_status_and_meaning():
    rows = table()
    for part, catalogue in catalogues().items():
        for code, (status, _) in catalogue.items():
            assert code in rows, f"docs/api.md's error table lacks {part}'s {code} ({status})"
            assert rows[code][0] == status, f"{code}: the table says {rows[code][0]}, {part}'s catalogue {status}"
            assert part in rows[code][1], f"{code}: the table does not say {part} answers it"


def test_every_code_in_the_table_is_in_a_catalogue_with_that_status():
    parts = catalogues()
    for code, (status, answered_by, meaning) in table().items():
        holders = {part for part, catalogue in parts.items() if code in catalogue}
        assert holders, f"docs/api.md lists {code}, which no catalogue holds"
        assert answered_by == holders, f"{code}: the table says {sorted(answered_by)}, the catalogues {sorted(holders)}"
        assert {parts[part][code][0] for part in holders} == {status}, code
        assert plain(meaning) in {plain(parts[part][code][1]) for part in holders}, \
            f"{code}: the table's meaning is none of the catalogues' ({meaning!r})"


@pytest.mark.parametrize("part", SOURCES)
def test_every_refusal_in_the_sources_uses_its_codes_status(part):
    """ClientError(400, "invalid_image", …) and the like: the status written is the catalogue's."""
    known = {**catalogues()[part], **observe.HOST_ERRORS}
    found = 0
    for path in SOURCES[part]:
        text = path.read_text()
        for status, code in REFUSAL.findall(text):
            found += 1
            assert code in known, f"{path.name}: {code} is in no catalogue"
            assert int(status) == known[code][0], f"{path.name}: {code} answered {status}, catalogued {known[code][0]}"
        for code in CODE_ONLY.findall(text):
            found += 1
            assert code in clip_errors.CATALOGUE, f"{path.name}: {code} is not in clip's catalogue"
    assert found > 5, f"the scan found almost no refusals in {part}: has their shape changed?"


def test_a_decoders_refusal_takes_its_status_from_the_catalogue():
    refused = clip_errors.BadImage("image_too_large", "The image is over the limit.")
    answer = refused.as_client_error()
    assert (answer.status, answer.code, answer.message) == (413, "image_too_large", "The image is over the limit.")

"""labels in a query or a form field: comma-separated text, or (starting with '[') a JSON list of
strings, the way to send labels that hold commas. A '[' that is no such list is a 400 saying so."""
import dataclasses

import pytest
from clip import config
from clip.errors import ClientError
from clip.labels import LABEL_SETS
from clip.options import OptionRules, parse_options
from support.images import noise_image
from support.inprocess import Event, service
from werkzeug.datastructures import MultiDict

RULES = OptionRules.of(config.Settings(), LABEL_SETS)


def labels(*values):
    return parse_options(MultiDict([("labels", v) for v in values]), RULES).labels


@pytest.mark.parametrize(("value", "expected"), [
    ('["cat","dog"]', ("cat", "dog")),
    (' [ "cat" , "dog, running" ] ', ("cat", "dog, running")),
    ('["a [bracketed] label"]', ("a [bracketed] label",)),
    ("cat,dog", ("cat", "dog")),
    ("cat, [dog]", ("cat", "[dog]")),  # only a value that starts with '[' is JSON
])
def test_a_json_list_or_comma_separated_text(value, expected):
    assert labels(value) == expected


def test_json_and_text_fields_add_up():
    assert labels('["cat","dog, running"]', "teapot,cat") == ("cat", "dog, running", "teapot")


@pytest.mark.parametrize("value", ['["cat","dog"', "[cat, dog]", "[1, 2]", '[["cat"]]', "[" * 100_000,
                                   '["cat"],["dog"]'])
def test_a_bracket_that_is_no_json_list_of_strings_is_a_400_that_says_how(value):
    with pytest.raises(ClientError) as refused:
        labels(value)
    assert (refused.value.status, refused.value.code) == (400, "invalid_labels")
    assert "JSON list of strings" in refused.value.message and "comma" in refused.value.message


def test_query_labels_as_a_json_list_classify_with_those_labels(tiny_model, clip_env):
    from clip import handler
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"])
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        query = [("labels", '["a cat","a dog, running"]'), ("top_k", "5")]
        answer = handler.handle(Event(noise_image("PNG"), "image/png", query=query), None)
        form = Event(b'--B\r\nContent-Disposition: form-data; name="labels"\r\n\r\n["a cat","a dog, running"]\r\n'
                     b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
                     + noise_image("PNG") + b"\r\n--B--\r\n", "multipart/form-data; boundary=B")
        from_form = handler.handle(form, None)
        bad = handler.handle(Event(noise_image("PNG"), "image/png", query=[("labels", '["cat","dog"')]), None)
    finally:
        handler.SERVICE = previous
    assert answer["statusCode"] == 200 and from_form["statusCode"] == 200
    assert sorted(p["label"] for p in answer["body"]["predictions"]) == ["a cat", "a dog, running"]
    assert answer["body"]["predictions"] == from_form["body"]["predictions"]
    assert bad["statusCode"] == 400 and bad["body"]["error"]["code"] == "invalid_labels"


def test_the_limits_count_the_lists_labels():
    tight = dataclasses.replace(RULES, max_labels=1)
    assert parse_options(MultiDict([("labels", '["cat, dog"]')]), tight).labels == ("cat, dog",)
    with pytest.raises(ClientError) as refused:
        parse_options(MultiDict([("labels", '["cat","dog"]')]), tight)
    assert refused.value.code == "too_many_labels"

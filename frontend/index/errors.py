"""index's error catalogue: every code index answers itself, with its one HTTP status and meaning, and
clip's codes, which index passes on with clip's status. docs/api.md's error table is held to these
(tests/test_error_catalogue.py); one status per code across clip, index and the template host."""

CATALOGUE: dict[str, tuple[int, str]] = {
    # clip, as seen from index
    "clip_bad_answer": (502, "clip answered with something other than the shapes of its contract"),
    "clip_unreachable": (502, "clip refused the connection or could not be reached"),
    "clip_unavailable": (503, "clip did not take the connection in time, or a gateway answered for it (scaling up)"),
    "clip_timeout": (504, "clip did not answer within CLIP_TIMEOUT_S, or a gateway gave up waiting for it"),
    # the request, refused by index before anything is forwarded (clip answers these the same way)
    "invalid_form": (400, "the form data could not be read"),
    "missing_image": (400, "the request holds no picture"),
    "too_many_images": (400, "more pictures than clip takes in one request"),
    "too_many_parts": (400, "a form with more parts than its pictures and options need"),
    "method_not_allowed": (405, "a method other than GET, HEAD and POST"),
}

# clip's codes, answered by clip and passed on by index with clip's status (held equal to the keys of
# backend/clip/errors.py's CATALOGUE by a test). The template host's own codes (observe.HOST_ERRORS),
# clip's host's included, are the host's to count.
PASSED_ON: frozenset[str] = frozenset(
    {
        "deadline_exceeded",
        "image_too_complex",
        "image_too_large",
        "invalid_form",
        "invalid_image",
        "invalid_json",
        "invalid_labels",
        "invalid_option",
        "label_set_warming",
        "loading",
        "method_not_allowed",
        "missing_image",
        "model_unavailable",
        "queue_full",
        "too_many_images",
        "too_many_labels",
        "too_many_parts",
        "unknown_label_set",
        "url_disabled",
        "url_refused",
        "url_timeout",
        "url_too_large",
        "url_unreachable",
    }
)

# The closed set of codes index's metrics and log lines may carry (any other is counted as "other").
ERROR_CODES: frozenset[str] = frozenset(CATALOGUE) | PASSED_ON


def status(code: str) -> int:
    """The one HTTP status of one of index's own codes."""
    return CATALOGUE[code][0]

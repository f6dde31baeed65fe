"""clip's error catalogue and its error types. Every module that refuses input (request parsing, options,
URL fetching, the service) raises ClientError; the image decoders, which know nothing of HTTP, raise
BadImage with a catalogue code; waits past their time raise DeadlineExceeded, a full queue QueueFull.
They live apart from every module that raises them, so none imports another to refuse.

CATALOGUE is every code clip answers, with its one HTTP status and meaning: docs/api.md's error table
and the OpenAPI document are held to it (tests/test_error_catalogue.py, tests/test_openapi.py), and so
is every ClientError(status, code, …) written in the sources. index passes these codes on with the same
status (frontend/index/errors.py PASSED_ON); the template host's own codes are observe.HOST_ERRORS."""

CATALOGUE: dict[str, tuple[int, str]] = {
    # the request's form
    "missing_image": (400, "the request holds no picture"),
    "too_many_images": (400, "more pictures than one request may hold (limits.max_images in GET)"),
    "too_many_parts": (400, "a form with more parts than its pictures and options need"),
    "invalid_form": (400, "the form data could not be read"),
    "invalid_json": (400, "the JSON body is not valid, not an object, or holds a value of the wrong type"),
    # the pictures
    "invalid_image": (400, "not an image clip reads, bad base64, or a corrupt file"),
    "image_too_complex": (400, "a decode bomb, refused from the file's structure before decoding"),
    "image_too_large": (413, "a picture over CLIP_MAX_PIXELS, refused from its header"),
    # the options
    "invalid_option": (400, "top_k is not a whole number of 1 or more, or another option is not one of its values"),
    "invalid_labels": (400, "labels is not a list of strings or comma-separated text, or a label is too long"),
    "too_many_labels": (400, "more custom labels than CLIP_MAX_LABELS"),
    "unknown_label_set": (400, "label_set names no label set clip has"),
    # text embeddings (POST /embeddings)
    "invalid_input": (400, "input is not a non-empty string or list of them, or one is over CLIP_MAX_LABEL_CHARS"),
    "too_many_inputs": (400, "more texts to embed than CLIP_MAX_LABELS"),
    # URL input
    "url_disabled": (400, "URL input is off (no CLIP_URL_ALLOW_HOSTS)"),
    "url_refused": (400, "the URL is not http(s), its host is not allowed, or it reaches a non-public address"),
    "url_unreachable": (400, "the URL's host could not be resolved or reached, or it answered other than 200"),
    "url_timeout": (400, "the download took longer than CLIP_URL_TIMEOUT_S"),
    "url_too_large": (413, "the URL's content is over CLIP_URL_MAX_BYTES"),
    # the method
    "method_not_allowed": (405, "a method other than GET, HEAD and POST"),
    # the function's state
    "queue_full": (429, "CLIP_MAX_QUEUE images already admitted; Retry-After says when to try again"),
    "loading": (503, "the model is still loading; Retry-After says when to try again"),
    "label_set_warming": (503, "the label set's embeddings are still being built; Retry-After says when"),
    "model_unavailable": (503, "the weights can be neither found nor downloaded; the message says the ways out"),
    "deadline_exceeded": (504, "no answer within CLIP_DEADLINE_S"),
}

# Codes only POST /embeddings answers: index, which forwards pictures to POST /, never passes them on.
EMBEDDINGS_ONLY: frozenset[str] = frozenset({"invalid_input", "too_many_inputs"})

# The closed set of codes clip's metrics and log lines may carry (any other is counted as "other").
ERROR_CODES: frozenset[str] = frozenset(CATALOGUE)


def status(code: str) -> int:
    """The one HTTP status of a code of the catalogue."""
    return CATALOGUE[code][0]


class ClientError(Exception):
    """Bad input, or a request the service cannot take now: becomes a JSON error with this status,
    never a 500."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        """What an answer carries of it: {"code", "message"}, never a stack trace."""
        return {"code": self.code, "message": self.message}


class BadImage(Exception):
    """A picture a decoder refuses: a code of the catalogue and a sentence saying why, no HTTP status
    (the catalogue's, given where it becomes an answer: as_client_error)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def as_client_error(self) -> ClientError:
        return ClientError(status(self.code), self.code, self.message)


class DeadlineExceeded(Exception):
    """A wait (the queue, a decoding slot, a text encoding) went past the request's deadline."""


class QueueFull(Exception):
    """Admitting the request would pass CLIP_MAX_QUEUE."""

"""What the page shows: clip's self-description and answers turned into the template's context. Every
piece of user input is cut to a screenful, so a huge field never becomes a huge page."""

import base64

from . import config
from .forms import Form, max_images

ECHO_MAX_CHARS = 2000  # a form field refilled on the results page; longer ones are left empty
MESSAGE_MAX_CHARS = 400  # an error message (clip may quote the input)
NAME_MAX_CHARS = 120  # a file name or an address
LABEL_MAX_CHARS = 200  # one result label (clip's own default limit)
ROWS_MAX = 20  # result rows per picture in the page without JavaScript
PREVIEW_MAX_BYTES = 2 * 1024 * 1024  # a picture echoed as a data: URL (page without JavaScript)...
PREVIEW_BUDGET_BYTES = 4 * 1024 * 1024  # ...and all of them together
PREVIEW_KINDS = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)
DEFAULT_TOP_K = 5  # clip's own default (CLIP_TOP_K), used while clip cannot be asked


def short(text: object, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def size_text(count: int) -> str:
    return (
        f"{count} bytes"
        if count < 1024
        else f"{count / 1024:.0f} KB"
        if count < 1024 * 1024
        else f"{count / 1024 / 1024:.1f} MB"
    )


def page_settings(info: dict | None) -> dict:
    """What the page offers, as clip describes itself; a plain fallback while clip cannot be asked."""
    info = info or {}
    names = [str(name) for name in info.get("label_sets") or []]
    own = [str(name) for name in info.get("file_sets") or [] if name in names]
    limits = info["limits"] if isinstance(info.get("limits"), dict) else {}
    clip_max_body = limits.get("max_body_bytes")
    max_bytes = min(config.MAX_BODY_BYTES, clip_max_body if isinstance(clip_max_body, int) else config.MAX_BODY_BYTES)
    return {
        "label_sets": names,
        # the operator's own sets (clip's label-set files) are offered in a group of their own
        "label_set_groups": [("Built in", [n for n in names if n not in own]), ("This function's", own)] if own else [],
        "default_label_set": str(info.get("default_label_set") or ""),
        "preparing": info.get("preparing") or {},  # name -> percent: "being prepared, N %"
        "max_images": max_images(info),
        "max_bytes": max_bytes,
        "url_input": info.get("url_input") is True,
        "top_k": info.get("default_top_k") or DEFAULT_TOP_K,
        "shrink_side": config.SHRINK_MAX_SIDE,
        "shrink_quality": config.SHRINK_QUALITY,
    }


def clip_status(info: dict | None, starting: dict | None, problem: str | None) -> dict:
    """Whether clip is ready, and what the page says while it is not: `GET ?status`, polled by the page
    while clip starts, and the page's own notice."""
    status: dict = {"ready": info is not None, "untrained": bool((info or starting or {}).get("untrained"))}
    if problem:
        status["problem"] = problem
    elif info is None:
        status["starting"] = starting is not None
        status["message"] = starting_text(starting)
    return status


def starting_text(starting: dict | None) -> str:
    if starting is None:  # no answer, or a gateway's: not deployed yet, scaling up, or restarting
        doing = "It does not answer yet (it may be starting or scaling up)."
    elif "model" in starting:
        doing = f"It is loading the model {short(starting['model'], NAME_MAX_CHARS)}"
        doing += f" (weights: {short(starting['pretrained'], NAME_MAX_CHARS)})."
    else:
        doing = "It is loading its libraries (PyTorch, open_clip)."
    return f"{doing} A first start can take a minute or more; this page updates itself when it is ready."


def refill(form: Form | None) -> dict:
    """The posted options, to refill the form; a field longer than a screenful is not echoed."""
    fields = form.fields if form else {}
    return {key: value if len(value) <= ECHO_MAX_CHARS else "" for key, value in fields.items()}


def answer_view(answer: dict | None) -> dict | None:
    """clip's answer with its texts cut short (messages may quote the input)."""
    if not answer:
        return None
    view = {key: answer.get(key) for key in ("model", "label_set", "elapsed_ms", "untrained")}
    if isinstance(answer.get("error"), dict):
        view["error"] = short(answer["error"].get("message", "The classifier refused the request."), MESSAGE_MAX_CHARS)
    return view


def cards(answer: dict | None, form: Form | None) -> list[dict]:
    """One card per picture sent, in clip's order (pictures, then addresses), with its own result."""
    if form is None:
        return []
    items = [
        {"name": short(name, NAME_MAX_CHARS), "sent": size_text(len(data)), "data": data}
        for name, data in form.pictures
    ]
    items += [{"name": short(url, NAME_MAX_CHARS), "sent": "by address", "data": None} for url in form.urls]
    answer = answer or {}
    if isinstance(answer.get("results"), list):
        outcomes = answer["results"]
    elif "predictions" in answer and len(items) == 1:
        outcomes = [answer]
    else:
        outcomes = []  # a request-wide error: shown once, above the cards
    budget = PREVIEW_BUDGET_BYTES
    for item, outcome in zip(items, outcomes + [None] * (len(items) - len(outcomes))):
        preview = _data_url(item.pop("data"), budget)
        budget -= len(preview or "") * 3 // 4
        item["preview"] = preview
        outcome = outcome if isinstance(outcome, dict) else {}
        if isinstance(outcome.get("error"), dict):
            item["error"] = short(
                outcome["error"].get("message", "This picture could not be classified."), MESSAGE_MAX_CHARS
            )
        item["predictions"] = [
            {"label": short(row.get("label", ""), LABEL_MAX_CHARS), "score": row.get("score", 0)}
            for row in (outcome.get("predictions") or [])[:ROWS_MAX]
        ]
    return items


def _data_url(data: bytes | None, budget: int) -> str | None:
    """The picture as a data: URL when small and of a kind every browser shows, so the page without
    JavaScript shows what was sent."""
    if not data or len(data) > min(PREVIEW_MAX_BYTES, budget):
        return None
    kind = next((kind for magic, kind in PREVIEW_KINDS if data.startswith(magic)), None)
    if kind is None or (kind == "image/webp" and data[8:12] != b"WEBP"):
        return None
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

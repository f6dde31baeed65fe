"""Every setting of the index function, declared once (type, default, allowed values) and read and checked
when this module is imported: the template host imports the handler at start, so a bad value stops index
there with one line naming the variable, the value and what is allowed (settings.SettingError)."""

from urllib.parse import urlsplit

import settings
from settings import Setting

DECLARATIONS = (
    Setting("CLIP_URL", str, "http://gateway.openfaas:8080/function/clip", doc="where to reach clip"),
    # The whole exchange (connect, upload, answer), not each read: >= clip's own deadline (CLIP_DEADLINE_S).
    Setting("CLIP_TIMEOUT_S", float, 60.0, minimum=0.1, maximum=3600, doc="deadline of a whole exchange with clip"),
    Setting("CLIP_CONNECT_TIMEOUT_S", float, 3.0, minimum=0.1, maximum=600, doc="the part of it a connection takes"),
    # After decompression. 16 pictures x 1,000 labels of 200 characters is under 4 MiB.
    Setting("INDEX_MAX_ANSWER_BYTES", int, 8 * 1024 * 1024, minimum=64 * 1024, doc="largest answer from clip"),
    Setting("INDEX_DESCRIBE_TIMEOUT_S", float, 2.0, minimum=0.1, maximum=600, doc="one fetch of clip's description"),
    Setting("INDEX_DESCRIBE_WAIT_S", float, 1.0, minimum=0, maximum=60, doc="how long a page waits for one"),
    Setting("INDEX_SHRINK_MAX_SIDE", int, 1024, minimum=224, maximum=16384, doc="pictures shrunk in the browser"),
    Setting("INDEX_SHRINK_QUALITY", float, 0.9, minimum=0.1, maximum=1, doc="JPEG quality of a shrunk picture"),
)
_values = settings.read(DECLARATIONS)

CLIP_URL: str = _values["CLIP_URL"]
TIMEOUT_S: float = _values["CLIP_TIMEOUT_S"]
CONNECT_TIMEOUT_S: float = _values["CLIP_CONNECT_TIMEOUT_S"]
MAX_ANSWER_BYTES: int = _values["INDEX_MAX_ANSWER_BYTES"]
DESCRIBE_TIMEOUT_S: float = _values["INDEX_DESCRIBE_TIMEOUT_S"]
DESCRIBE_WAIT_S: float = _values["INDEX_DESCRIBE_WAIT_S"]
SHRINK_MAX_SIDE: int = _values["INDEX_SHRINK_MAX_SIDE"]
SHRINK_QUALITY: float = _values["INDEX_SHRINK_QUALITY"]
MAX_BODY_BYTES: int = settings.host()["MAX_BODY_BYTES"]  # the host's limit, shown on the page


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        good = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        good = good and not parts.query and not parts.fragment  # index adds the request's own query
    except ValueError:  # a port out of range, an unclosed [IPv6 address]
        good = False
    if not good:
        shown = url if len(url) <= settings.SHOWN_CHARS else url[: settings.SHOWN_CHARS - 3] + "..."
        raise settings.SettingError(
            f"CLIP_URL must be an http:// or https:// URL with a host and no query, not {shown!r}"
        )


_check_url(CLIP_URL)

# Optional, beside handle(): init() (runs once before the function reports ready), alive() (polled once
# ready; False takes the replica out), shutdown() (runs once on SIGTERM, after the drain), NAME (the
# prefix of the host's metrics and the access log's function name), ERROR_CODES, sample() (sets your
# gauges before a scrape) and error_page() (HTML for the host's own refusals). Settings: settings.py.
# See the template's README.md.

from typing import Any


def handle(event: Any, context: Any) -> dict:
    """Answer one request. event: body (bytes), headers, method, query, path; context: request_id, note()."""
    return {
        "statusCode": 200,
        "body": {"hello": "world", "method": event.method, "bytes": len(event.body)},
        "headers": {"Content-Type": "application/json"},
    }

# Optional, beside handle(): init() (runs once before the function reports ready), alive() (polled once
# ready; False takes the replica out) and shutdown() (runs once on SIGTERM, after the drain).

from typing import Any


def handle(event: Any, context: Any) -> dict:
    """Answer one request. event: body (bytes), headers, method, query, path."""
    return {
        "statusCode": 200,
        "body": {"hello": "world", "method": event.method, "bytes": len(event.body)},
        "headers": {"Content-Type": "application/json"},
    }

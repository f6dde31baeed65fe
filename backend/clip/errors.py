"""The service's error type. Every module that refuses input (request parsing, image decoding, options,
URL fetching, the service itself) raises it, so it lives apart from all of them."""


class ClientError(Exception):
    """Bad input, or a request the service cannot take now: becomes a JSON error with this status,
    never a 500."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        """What an answer carries of it: {"code", "message"}, never a stack trace."""
        return {"code": self.code, "message": self.message}

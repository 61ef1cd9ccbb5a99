"""The error of a request with a bad field (its own module: the request and its parts raise it)."""


class RequestError(ValueError):
    """A request with a bad field; the message names the field."""

"""contextlib.suppress without contextlib's own imports (collections, functools), which the
container start path would pay for on every start."""

from __future__ import annotations


class suppress:  # noqa: N801 - named after the contextlib helper it replaces
    """contextlib.suppress, as a plain class."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: object, tb: object) -> bool:
        return kind is not None and issubclass(kind, self.exceptions)

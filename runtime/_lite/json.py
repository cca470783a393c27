"""JSON for the container start path through CPython's C accelerator (_json) alone.

`import json` imports re, and re imports enum: a cost on every `stockade-oci` start
(bench/README.md), while the C scanner and encoder that json uses underneath need neither.
Same results as json.loads/json.dumps (compact separators); malformed input is handed to the
json package after all, so errors carry its message, line and column (json.JSONDecodeError).
"""

from __future__ import annotations

import _json

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Decoding:
    """The attributes _json.make_scanner reads (what json.JSONDecoder would hold)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_CONSTANTS.__getitem__)

    def __init__(self) -> None:
        self.memo: dict = {}


def loads(text: str | bytes) -> object:
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    scan = _json.make_scanner(_Decoding())
    try:
        value, end = scan(text, _skip(text, 0))
    except StopIteration:
        return _strict_loads(text)
    if _skip(text, end) != len(text):
        return _strict_loads(text)
    return value


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WHITESPACE:
        i += 1
    return i


def _strict_loads(text: str) -> object:
    import json  # only for malformed input: raises JSONDecodeError with line and column

    return json.loads(text)


def _unserializable(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _encoder(sort_keys: bool):  # noqa: ANN202 - a _json.make_encoder callable
    return _json.make_encoder(
        {}, _unserializable, _json.encode_basestring_ascii, None, ":", ",", sort_keys, False, True
    )


_ENCODERS = {False: _encoder(False), True: _encoder(True)}


def dumps(obj: object, sort_keys: bool = False) -> str:
    """Compact JSON (no indentation: the C encoder has none), ASCII-escaped: what
    json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys) returns."""
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    return "".join(_ENCODERS[sort_keys](obj, 0))

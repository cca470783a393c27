"""The start path's stand-ins (stockade.runtime._lite) against the stdlib modules they replace.
The lifecycle parser (_lite.argparse) is checked against argparse in test_oci_cli.py
(test_fast_argument_parsing_agrees_with_argparse, test_unusual_arguments_go_to_argparse)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json

import pytest
from stockade.runtime._lite import contextlib as lite_contextlib
from stockade.runtime._lite import dataclasses as lite_dataclasses
from stockade.runtime._lite import hashlib as lite_hashlib
from stockade.runtime._lite import json as lite_json

DOCUMENTS = [
    {"ociVersion": "1.2.0", "process": {"args": ["sh", "-c", "echo \u00e9\u2603 \"q\" \\ \t"], "env": []}},
    [1, -2, 3.5, 1e300, -0.0, True, False, None, "", {}, []],
    {"z": 1, "a": {"y": [2, {"b": None}], "x": "\x00\x1f\ud83d\ude00"}},
    "just a string",
    12345678901234567890,
]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_json_agrees_with_json(doc: object) -> None:
    for sort_keys in (False, True):
        expected = json.dumps(doc, separators=(",", ":"), sort_keys=sort_keys)
        assert lite_json.dumps(doc, sort_keys=sort_keys) == expected
    text = json.dumps(doc, indent=2)
    assert lite_json.loads(text) == json.loads(text)
    assert lite_json.loads(text.encode()) == json.loads(text.encode())


@pytest.mark.parametrize("text", ['{"a": 1,}', "[1, 2", '{"a" 1}', "", "  \n nul", '"\\x"', "[1] x"])
def test_json_errors_are_jsons(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as ours:
        lite_json.loads(text)
    assert (ours.value.msg, ours.value.lineno, ours.value.colno) == (
        theirs.value.msg, theirs.value.lineno, theirs.value.colno,
    )


def test_json_refuses_what_json_refuses() -> None:
    for value in (object(), {1, 2}, b"bytes"):
        with pytest.raises(TypeError):
            json.dumps(value)
        with pytest.raises(TypeError):
            lite_json.dumps(value)


def _pair() -> tuple[type, type]:
    """The same class through dataclasses.dataclass and through _lite's."""

    def body() -> dict:
        return {
            "__annotations__": {"name": "str", "count": "int", "tags": "list[str]", "extra": "dict"},
            "count": 0,
        }

    theirs = dataclasses.dataclass(type("Item", (), {
        **body(), "tags": dataclasses.field(default_factory=list), "extra": dataclasses.field(
            default_factory=dict, repr=False, compare=False)}))
    ours = lite_dataclasses.dataclass(type("Item", (), {
        **body(), "tags": lite_dataclasses.field(default_factory=list), "extra": lite_dataclasses.field(
            default_factory=dict, repr=False, compare=False)}))
    return theirs, ours


def test_lite_dataclass_agrees_with_dataclass() -> None:
    theirs, ours = _pair()
    for args, kwargs in (((), {"name": "a"}), (("b", 3), {}), (("c",), {"tags": ["x"], "extra": {"k": 1}})):
        t, o = theirs(*args, **kwargs), ours(*args, **kwargs)
        assert repr(o) == repr(t)
        assert lite_dataclasses.asdict(o) == dataclasses.asdict(t)
    assert ours("a") == ours("a") and ours("a") != ours("a", 1)
    assert ours("a", extra={"x": 1}) == ours("a")  # compare=False, as with dataclasses
    assert ours("a").tags is not ours("a").tags  # a fresh default per instance
    bad_calls = (((), {}), (("a", 1, [], {}, 5), {}), (("a",), {"name": "b"}), ((), {"nope": 1}))
    for bad_args, bad_kwargs in bad_calls:
        with pytest.raises(TypeError):
            theirs(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError):
            ours(*bad_args, **bad_kwargs)


def test_sha256_agrees_with_hashlib() -> None:
    for data in (b"", b"stockade", bytes(range(256)) * 1000):
        ours, theirs = lite_hashlib.sha256(data), hashlib.sha256(data)
        assert ours.hexdigest() == theirs.hexdigest()
        ours.update(b"more")
        theirs.update(b"more")
        assert ours.digest() == theirs.digest()


def test_suppress_agrees_with_contextlib() -> None:
    for cls in (contextlib.suppress, lite_contextlib.suppress):
        with cls(KeyError, OSError):
            raise FileNotFoundError
        with cls(KeyError):
            pass
        with pytest.raises(ValueError), cls(KeyError):
            raise ValueError


def test_lean_argparse_is_scoped_and_says_the_same() -> None:
    """Plain strings instead of gettext lookups while active; argparse's own functions after."""
    import argparse

    from stockade.runtime._lite.argparse import lean_argparse

    def usage_error() -> str:
        parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
        parser.add_argument("--n", type=int)
        with pytest.raises(argparse.ArgumentError) as err:
            parser.parse_args(["--n", "x"])
        return str(err.value)

    before = (argparse._, argparse.ngettext)
    expected = usage_error()
    with lean_argparse():
        assert argparse._ is str
        assert usage_error() == expected
    assert (argparse._, argparse.ngettext) == before

"""Plain-data classes for the container start path, without the cost of `dataclasses`.

`dataclasses` imports `inspect` (and with it ast, dis, tokenize) and compiles every generated
method with exec() for each of the ~30 classes that parse a spec, on every container start
(bench/README.md has the cost). `dataclass` here builds the same shape - keyword/positional
__init__ with defaults and default factories, __repr__, __eq__ - from closures, at no import
cost. Only what the runtime uses: no frozen, slots, ordering or __post_init__.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
_MISSING: Any = object()


class field:  # noqa: N801 - same spelling as dataclasses.field, which it replaces
    """A default for a field: a value, or a factory called per instance."""

    __slots__ = ("default", "default_factory", "repr", "compare")

    def __init__(
        self,
        *,
        default: Any = _MISSING,
        default_factory: Any = None,
        repr: bool = True,  # noqa: A002
        compare: bool = True,
    ) -> None:
        self.default, self.default_factory = default, default_factory
        self.repr, self.compare = repr, compare


def dataclass(cls: type[T]) -> type[T]:
    """Give `cls` an __init__, __repr__ and __eq__ from its annotated fields (base classes first)."""
    specs: dict[str, field] = {}
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            value = klass.__dict__.get(name, _MISSING)
            specs[name] = value if isinstance(value, field) else field(default=value)
    for name in specs:
        if isinstance(cls.__dict__.get(name), field):
            delattr(cls, name)  # instances carry the value; the class keeps no shared default
    names = tuple(specs)
    cls.__lite_fields__ = names  # type: ignore[attr-defined]
    cls.__lite_repr__ = tuple(n for n in names if specs[n].repr)  # type: ignore[attr-defined]
    cls.__lite_compare__ = tuple(n for n in names if specs[n].compare)  # type: ignore[attr-defined]
    cls.__init__ = _make_init(cls.__name__, names, specs)  # type: ignore[misc]
    cls.__repr__ = _repr  # type: ignore[assignment]
    cls.__eq__ = _eq  # type: ignore[assignment]
    cls.__hash__ = None  # type: ignore[assignment] - mutable, like a dataclass with eq=True
    return cls


def _make_init(class_name: str, names: tuple[str, ...], specs: dict[str, field]):  # noqa: ANN202
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{class_name}() takes {len(names)} positional arguments, {len(args)} given")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{class_name}() got multiple values for argument {name!r}")
            kwargs[name] = value
        for name in names:
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
                continue
            spec = specs[name]
            if spec.default_factory is not None:
                setattr(self, name, spec.default_factory())
            elif spec.default is not _MISSING:
                setattr(self, name, spec.default)
            else:
                raise TypeError(f"{class_name}() missing required argument {name!r}")
        if kwargs:
            raise TypeError(f"{class_name}() got an unexpected keyword argument {next(iter(kwargs))!r}")

    return __init__


def _repr(self: Any) -> str:
    body = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__lite_repr__)
    return f"{type(self).__name__}({body})"


def _eq(self: Any, other: Any) -> bool:
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, n) == getattr(other, n) for n in self.__lite_compare__)


def asdict(obj: Any) -> Any:
    """Records to dicts, recursively through lists, tuples and dicts (like dataclasses.asdict)."""
    if hasattr(type(obj), "__lite_fields__"):
        return {name: asdict(getattr(obj, name)) for name in obj.__lite_fields__}
    if isinstance(obj, list | tuple):
        return type(obj)(asdict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: asdict(v) for k, v in obj.items()}
    return obj


def is_dataclass(obj: Any) -> bool:
    return hasattr(type(obj), "__lite_fields__")

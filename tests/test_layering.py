"""The package layering of ARCHITECTURE.md ("Layers"), checked on every import in the source,
module-level or inside functions: a change that breaks it fails here, naming the import."""

from __future__ import annotations

import ast
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
FOLDERS = {name: f"stockade.{name}" for name in ("runtime", "bpf", "profiles", "cri")}

# Layers, lowest first. A module may import its own layer and the layers below it.
BASE = tuple(f"stockade.runtime.{name}" for name in ("errors", "_lite", "linux", "files", "yamldoc"))
CLIS = (
    "stockade.runtime.cli",
    "stockade.runtime.oci_cli",
    "stockade.runtime.run",
    "stockade.runtime.doctor",
    "stockade.runtime.images.cli",
    "stockade.bpf.cli",
    "stockade.bpf.agent",
    "stockade.profiles.cli",
    "stockade.cri.cli",
)
LAYERS = (
    ("base", BASE),
    ("bpf", ("stockade.bpf",)),
    ("runtime", ("stockade.runtime",)),
    ("profiles", ("stockade.profiles",)),
    ("cri", ("stockade.cri",)),
    ("cli", CLIS),
)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int:
    """The highest layer whose prefixes name the module (a CLI is in `cli`, not its package)."""
    found = [i for i, (_, prefixes) in enumerate(LAYERS) if _within(module, prefixes)]
    if not found:
        raise AssertionError(f"{module} is in no layer")
    return found[-1] if _within(module, CLIS) else found[0]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (CHECKOUT / folder).rglob("*.py"):
            rel = path.relative_to(CHECKOUT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported stockade module) for every import statement in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("stockade.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("stockade."):
                continue
            # `from stockade.runtime import spec` imports the module stockade.runtime.spec
            subs = [f"{target}.{a.name}" for a in node.names]
            found += [(node.lineno, sub if sub in _ALL else target) for sub in subs]
    return found


_ALL = modules()


def test_every_import_respects_the_layers() -> None:
    broken = []
    for module, path in sorted(_ALL.items()):
        mine = layer_of(module)
        for line, target in imports(module, path):
            if target.split(".")[:2] == ["stockade", "tests"]:
                continue
            theirs = layer_of(target)
            library_to_cli = _within(target, CLIS) and not _within(module, CLIS)
            if theirs > mine or library_to_cli:
                where = path.relative_to(CHECKOUT)
                broken.append(f"{where}:{line}: {module} ({LAYERS[mine][0]}) imports {target} "
                              f"({LAYERS[theirs][0]})")
    assert broken == []


def test_the_check_sees_imports_inside_functions() -> None:
    """The check itself: a relative import in a function body, resolved and placed in its layer."""
    path = _ALL["stockade.runtime.container"]
    targets = {t for _, t in imports("stockade.runtime.container", path)}
    assert "stockade.runtime.init" in targets  # imported inside _create_in
    assert layer_of("stockade.runtime.run") == len(LAYERS) - 1
    assert layer_of("stockade.runtime._lite.json") == 0

"""process.capabilities -> bounding, permitted/effective/inheritable and ambient sets.

drop_bounding() runs before setuid (dropping needs CAP_SETPCAP in the effective set, which
setuid clears); apply() runs after setuid (PR_SET_KEEPCAPS kept the permitted set across it)
and before execve.
"""

from __future__ import annotations

# python-prctl's C module: its Python face (prctl.py) builds properties for every capability and
# prctl option when imported, a cost on every container start (bench/README.md) for three calls.
import _prctl

from . import syscalls as sc
from .errors import NotSupported, StockadeError
from .linux import CAPABILITIES
from .spec import Capabilities


def held_bounding() -> set[int]:
    """Capabilities in our own bounding set: what we could possibly give a container."""
    return {n for n in _known() if _prctl.prctl(_prctl.PR_CAPBSET_READ, n)}


def _known() -> list[int]:
    """Capability numbers both this module and the running kernel know."""
    return [n for n in CAPABILITIES.values() if n <= _prctl.CAP_LAST_CAP]


def check_grantable(caps: Capabilities, where: str = "process.capabilities") -> None:
    """Refuse a capability the runtime itself does not hold (it could not be granted)."""
    held = held_bounding()
    for name in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        for i, cap in enumerate(getattr(caps, name)):
            if CAPABILITIES[cap] not in held:
                raise NotSupported(
                    f"{cap} is requested but the runtime itself does not hold it",
                    where=f"{where}.{name}[{i}]",
                    hint="remove it from the spec",
                )


def drop_bounding(caps: Capabilities) -> None:
    """Shrink the bounding set; needs CAP_SETPCAP in effective, so call it before setuid."""
    keep = {CAPABILITIES[c] for c in caps.bounding}
    try:
        for n in sorted(held_bounding() - keep):
            _prctl.prctl(_prctl.PR_CAPBSET_DROP, n)
    except OSError as exc:
        raise StockadeError(
            f"cannot drop bounding capabilities: {exc.strerror}", where="process.capabilities.bounding"
        ) from None


def apply(caps: Capabilities) -> None:
    """Set effective/permitted/inheritable exactly, then raise the ambient ones (after setuid)."""
    try:
        sets = (caps.effective, caps.permitted, caps.inheritable)
        on = [{CAPABILITIES[c] for c in names} for names in sets]
        every = set(_known())
        # one capset(2) for the three sets: (effective, permitted, inheritable) to raise, then to clear
        _prctl.set_caps(*(sorted(s) for s in on), *(sorted(every - s) for s in on))
        sc.cap_ambient_clear_all()
        raisable = set(caps.permitted) & set(caps.inheritable)  # spec.py refused the rest unless uid 0
        for c in caps.ambient:
            if c in raisable:
                sc.cap_ambient_raise(CAPABILITIES[c])
    except OSError as exc:
        raise StockadeError(
            f"cannot set capabilities: {exc.strerror}", where="process.capabilities"
        ) from None

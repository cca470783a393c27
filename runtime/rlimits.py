"""process.rlimits -> setrlimit(2) in the container init (they survive execve)."""

from __future__ import annotations

import resource

from .errors import StockadeError
from .linux import RLIM_INFINITY, RLIMITS
from .spec import Rlimit


def apply(rlimits: list[Rlimit]) -> None:
    for i, r in enumerate(rlimits):
        soft = resource.RLIM_INFINITY if r.soft == RLIM_INFINITY else r.soft
        hard = resource.RLIM_INFINITY if r.hard == RLIM_INFINITY else r.hard
        try:
            resource.setrlimit(RLIMITS[r.type], (soft, hard))
        except (OSError, ValueError) as exc:
            current = resource.getrlimit(RLIMITS[r.type])[1]
            hint = f"the runtime's own hard limit is {'unlimited' if current < 0 else current}"
            if isinstance(exc, OSError):
                hint += " and it lacks CAP_SYS_RESOURCE to raise it"
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise StockadeError(
                f"cannot set {r.type} to soft={r.soft} hard={r.hard}: {reason}",
                where=f"process.rlimits[{i}]",
                hint=hint,
            ) from None

"""One error type for everything a user can get wrong or a host cannot do.

Every message says what is wrong, where (file, field, line), and how to fix it; the CLIs
print it and exit non-zero. Nothing that raises this may leave kernel objects behind.
"""

from __future__ import annotations


class StockadeError(Exception):
    """A refusal with a reason. `where` names the file/field, `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, what: str, *, where: str = "", hint: str = "") -> None:
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} ({self.hint})" if self.hint else text


class SpecError(StockadeError):
    """The OCI config, a profile or a policy is malformed or asks for something unsupported."""


class NotSupported(StockadeError):
    """The host cannot enforce a layer the configuration requires (never weakened in silence)."""


class ContainerError(StockadeError):
    """A lifecycle request that does not fit the container's state (unknown ID, wrong status)."""

"""Records on disk, one directory per pod or container named by its 64-hex id, one JSON file in
each (written atomically and durably): what survives a restart of the server."""

from __future__ import annotations

import os

from stockade.runtime._lite import json
from stockade.runtime._lite.dataclasses import asdict
from stockade.runtime.files import write_atomic

from .errors import NotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Records:
    def __init__(self, root: str, filename: str, kind: type, what: str, where: str) -> None:
        self.root, self.filename, self.kind, self.what, self.where = root, filename, kind, what, where
        os.makedirs(root, mode=0o711, exist_ok=True)

    def dir(self, rid: str) -> str:
        if len(rid) != 64 or rid.strip("0123456789abcdef"):
            raise NotFound(f"no {self.what} {rid!r}", where=self.where)
        return os.path.join(self.root, rid)

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if len(n) == 64)
        except FileNotFoundError:
            return []

    def load(self, rid: str) -> Any:
        try:
            with open(os.path.join(self.root, rid, self.filename)) as f:
                return self.kind(**json.loads(f.read()))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def save(self, record: Any) -> None:
        path = os.path.join(self.dir(record.id), self.filename)
        write_atomic(path, json.dumps(asdict(record)), durable=True)

    def all(self) -> list[Any]:
        return [r for r in (self.load(i) for i in self.ids()) if r is not None]

    def find(self, ref: str) -> Any:
        """A record by id or unique id prefix (as crictl accepts); None when there is none."""
        if not ref:
            return None
        found = [n for n in self.ids() if n.startswith(ref)]
        return self.load(found[0]) if len(found) == 1 else None

    def get(self, ref: str) -> Any:
        found = self.find(ref)
        if found is None:
            raise NotFound(f"no {self.what} {ref!r}", where=self.where)
        return found

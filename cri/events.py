"""Container events for GetContainerEvents (kubelet's evented PLEG): created, started, stopped,
deleted, fanned out to every subscriber's queue. A stopped event comes when conmon writes the
exit file, seen by a watcher thread, not only when someone asks for the status."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

from cri_api.v1 import api_pb2 as pb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CREATED, STARTED, STOPPED, DELETED = (pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
                                      pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT)
BACKLOG = 1024  # events a slow subscriber may fall behind by before it loses the oldest


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: list[queue.Queue] = []

    def emit(self, cid: str, kind: int) -> None:
        item = (cid, kind, time.time_ns())
        with self.lock:
            for q in self.queues:
                if q.full():
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()
                q.put_nowait(item)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[queue.Queue]:
        q: queue.Queue = queue.Queue(BACKLOG)
        with self.lock:
            self.queues.append(q)
        try:
            yield q
        finally:
            with self.lock:
                self.queues.remove(q)


def watch_exits(directory: str, on_exit: Callable[[str], None], stop: threading.Event,
                every: float = 0.2) -> threading.Thread:
    """A thread calling ON_EXIT(container id) for each exit file conmon writes into DIRECTORY."""

    def run() -> None:
        seen = set(os.listdir(directory))
        while not stop.wait(every):
            now = set(os.listdir(directory))
            for cid in sorted(now - seen):
                on_exit(cid)
            seen = now

    thread = threading.Thread(target=run, name="cri-exits", daemon=True)
    thread.start()
    return thread

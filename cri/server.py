"""`stockade cri serve`: the CRI runtime.v1 gRPC server on a unix socket.

kubelet, crictl and critest connect here. The server holds no container's life: containers are
watched by their own processes, so stopping the server (SIGTERM, SIGINT) stops answering and
leaves every pod and container running.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from cri_api.v1 import api_pb2_grpc as pb_grpc
from stockade.runtime.errors import StockadeError
from stockade.runtime.files import write_atomic
from stockade.runtime.images.store import Store

from .events import watch_exits
from .image_service import ImageService
from .runtime_service import RuntimeService

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .config import Config

MAX_MESSAGE = 16 << 20  # what kubelet allows (ListContainers on a big node)
WORKERS = 16
GRACE = 5.0  # seconds calls in flight get to finish on SIGTERM

log = logging.getLogger("stockade.cri")


def serve(config: Config, ready: threading.Event | None = None) -> int:
    setup_logging(config.log_level, config.log_format)
    os.makedirs(config.state_dir, mode=0o711, exist_ok=True)  # containers' inits pass through
    _claim_socket(config.socket)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cri"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    store = Store(config.image_store)
    runtime = RuntimeService(config, store)
    runtime.start_streaming()  # a port it cannot have stops the server before anything is served
    pb_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    pb_grpc.add_ImageServiceServicer_to_server(ImageService(config, store), server)
    stop = threading.Event()
    runtime.agent = _start_agent(config, stop)  # before the socket: no pod before its programs
    if server.add_insecure_port(f"unix://{config.socket}") == 0:
        raise StockadeError("cannot listen on the socket", where=config.socket)
    watch_exits(runtime.containers.exits, runtime.containers.on_exit_file, stop)
    if runtime.network is not None:
        _log_denials(runtime, stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    os.chmod(config.socket, 0o660)
    write_atomic(os.path.join(config.state_dir, "server.pid"), f"{os.getpid()}\n", mode=0o644)
    log.info("serving CRI runtime.v1 on %s (handlers: %s)", config.socket, ", ".join(sorted(config.handlers)))
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("stopping: calls in flight get %.0fs; containers keep running", GRACE)
    server.stop(GRACE).wait()
    if runtime.streaming is not None:
        runtime.streaming.stop()
    runtime.close()
    for path in (config.socket, os.path.join(config.state_dir, "server.pid")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0


def _start_agent(config: Config, stop: threading.Event) -> dict:
    """The BPF agent in this process: programs loaded (from the cache when it has them), attached
    at the cgroup the pods go below, pinned; a thread streams their events until STOP. What it
    leaves pinned outlives the server, as the agent's does (`stockade agent --stop` removes it)."""
    if not config.bpf_agent:
        return {"running": False, "reason": "bpf_agent = false (another agent, or none needed)"}
    from stockade.bpf import attach, events, maps

    root = os.environ.get("STOCKADE_BPF_CGROUP_ROOT") or os.path.join(
        attach.unified_mount(), config.cgroup_parent.strip("/").split("/")[0])
    report = attach.setup(maps.PIN_DIR, root)
    threading.Thread(target=events.pump, args=(maps.PIN_DIR, events.EVENTS_FILE), kwargs={"until": stop},
                     name="bpf-events", daemon=True).start()
    log.info("BPF agent: programs at %s (%s), LSM %s%s", root, report["cgroup_programs"],
             "on" if report["lsm"] else "off", "" if report["lsm"] else f" ({report['lsm_reason']})")
    return {"running": True, **report}


def _log_denials(runtime: RuntimeService, stop: threading.Event) -> None:
    """What the tenant rules drop, into the events stream (a thread reading the NFLOG group)."""
    from stockade.bpf.events import EVENTS_FILE

    from . import netlog

    def run() -> None:
        try:
            netlog.pump(EVENTS_FILE, runtime.pods.by_address, stop)
        except OSError as exc:  # another reader holds the group: denials stay counted, not logged
            log.warning("network denials are not logged as events: %s", exc)

    threading.Thread(target=run, name="net-denials", daemon=True).start()


def _claim_socket(path: str) -> None:
    """Take over a socket a dead server left behind; refuse one a live server answers on."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover
        return
    finally:
        probe.close()
    raise StockadeError("another server is listening on this socket", where=path,
                        hint="stop it, or give this one --socket PATH")


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{_stamp(record.created)} level={record.levelname.lower()} msg={record.getMessage()!r}"
        return text + (f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        line = {"time": _stamp(record.created), "level": record.levelname.lower(), "msg": record.getMessage()}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    root = logging.getLogger("stockade")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

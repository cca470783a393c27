"""Streaming (exec, attach, port-forward) against a real server: the URLs that real Exec, Attach
and PortForward calls return, spoken to in SPDY/3.1 and in WebSocket by tests/streamclient.py,
with containers of a busybox image; bad input on one connection hurts no other."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from images import busybox_image
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name
from leftovers import new_since, snapshot
from stockade.cri import spdy
from stockade.runtime.images.archive import import_archive
from stockade.runtime.images.store import Store
from streamclient import Spdy, Ws, http_head, spdy_exec

from cri import Server, fast_tmp, pb, status_code, stop_and_remove

pytestmark = pytest.mark.usefixtures("needs_root")

IMAGE = "localhost/test/busybox:1"
CONFIG = """[stockade]
default_handler = "plain"
[stockade.handlers.plain]
profile = "runtime-default"
allow_degraded = true
"""
SUCCESS = {"metadata": {}, "status": "Success"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require(shutil.which("conmon"), "conmon (setup)")
    tmp = tmp_path_factory.mktemp("streaming")
    base = fast_tmp()
    (base / "images").mkdir(parents=True)
    import_archive(Store(str(base / "images")), str(busybox_image(tmp / "bb.tar", IMAGE)))
    (base / "stockade.toml").write_text(CONFIG)
    before = snapshot()
    srv = Server(base, config=base / "stockade.toml")
    try:
        yield srv
    finally:
        stop_and_remove(srv)
        assert new_since(before) == {}


@pytest.fixture(scope="module")
def pod(server: Server) -> tuple[str, pb.PodSandboxConfig]:
    return _pod(server)


def container(server: Server, pod: tuple[str, pb.PodSandboxConfig], name: str, *command: str,
              stdin: bool = False, tty: bool = False, stdin_once: bool = False) -> str:
    pod_id, pod_config = pod
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=IMAGE),
                                command=list(command), log_path=f"{name}.log", stdin=stdin, tty=tty,
                                stdin_once=stdin_once)
    cid = server.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)).container_id
    server.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


@pytest.fixture(scope="module")
def sleeper(server: Server, pod: tuple[str, pb.PodSandboxConfig]) -> str:
    return container(server, pod, "sleeper", "sleep", "1000")


def exec_url(server: Server, cid: str, *cmd: str, **kw: bool) -> str:
    kw.setdefault("stdout", True)
    kw.setdefault("stderr", not kw.get("tty"))
    return server.runtime.Exec(pb.ExecRequest(container_id=cid, cmd=list(cmd), **kw)).url


def procs(server: Server, cid: str) -> list[str]:
    """The processes in the container's cgroup (the unified tree's view)."""
    state = json.loads((server.base / "state/oci" / cid / "state.json").read_text())
    return Path("/sys/fs/cgroup/unified", state["cgroup_path"], "cgroup.procs").read_text().split()


# -- exec ------------------------------------------------------------------------------------

def test_exec_echo_over_spdy_returns_exactly_hello(server: Server, sleeper: str) -> None:
    out, err, status = spdy_exec(exec_url(server, sleeper, "echo", "hello"))
    assert (out, err, status) == (b"hello\n", b"", SUCCESS)


def test_a_non_zero_exit_code_comes_back_in_the_status(server: Server, sleeper: str) -> None:
    out, err, status = spdy_exec(exec_url(server, sleeper, "sh", "-c", "echo out; echo err >&2; exit 3"))
    assert (out, err) == (b"out\n", b"err\n")
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    # protocols before v4 say only what went wrong, as text
    _, _, text = spdy_exec(exec_url(server, sleeper, "sh", "-c", "exit 4"), protocol="v2.channel.k8s.io")
    assert b"exit code 4" in text


def test_output_nobody_asked_for_does_not_stop_the_process(server: Server, sleeper: str) -> None:
    """stdout not asked for: it is read and dropped, so 200 kB of it (more than a pipe holds)
    does not block the process before it reaches its stderr and its end."""
    url = exec_url(server, sleeper, "sh", "-c", "head -c 200000 /dev/zero; echo done >&2", stdout=False)
    assert spdy_exec(url, stdout=False) == (b"", b"done\n", SUCCESS)


def test_exec_stdin_reaches_the_process_and_its_end_too(server: Server, sleeper: str) -> None:
    out, _, status = spdy_exec(exec_url(server, sleeper, "sh", "-c", "cat; echo done", stdin=True), b"abc\n")
    assert (out, status) == (b"abc\ndone\n", SUCCESS)


def test_an_interactive_shell_with_a_tty_resizes(server: Server, sleeper: str) -> None:
    url = exec_url(server, sleeper, "sh", stdin=True, tty=True)
    out, err, status = spdy_exec(url, b"stty size; exit 7\n", tty=True, sizes=[(30, 100)])
    assert b"30 100" in out and err == b""
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]


def test_exec_over_websocket_v5_and_v4(server: Server, sleeper: str) -> None:
    for protocol in ("v5.channel.k8s.io", "v4.channel.k8s.io"):
        ws = Ws(exec_url(server, sleeper, "sh", "-c", "echo hello; echo oops >&2; exit 2"), [protocol])
        try:
            assert ws.protocol == protocol
            out, err, status = ws.read_all(1), ws.read_all(2), json.loads(ws.read_all(3))
        finally:
            ws.close()
        assert (out, err) == (b"hello\n", b"oops\n") and status["reason"] == "NonZeroExitCode"
        assert ws.close_code == 1000
        assert ws.messages[0] == b"\x01"  # the first message: an empty one on stdout, as kubelet's


def test_many_parallel_execs_each_get_their_own_output(server: Server, sleeper: str) -> None:
    urls = [exec_url(server, sleeper, "sh", "-c", f"sleep 0.2; echo {i}") for i in range(12)]
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i, u=u: results.__setitem__(i, spdy_exec(u)))
               for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: r[0] for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(12)}
    assert all(r[2] == SUCCESS for r in results.values())


def test_a_client_that_leaves_kills_its_own_process_only(server: Server, sleeper: str) -> None:
    before = procs(server, sleeper)
    c = Spdy(exec_url(server, sleeper, "sh", "-c", "echo started; sleep 1000"))
    error, out, err = c.open(streamType="error"), c.open(streamType="stdout"), c.open(streamType="stderr")
    assert c.data[out].get(timeout=30) == b"started\n"
    assert len(procs(server, sleeper)) > len(before)
    c.close()
    deadline = time.monotonic() + 10
    while procs(server, sleeper) != before:
        assert time.monotonic() < deadline, procs(server, sleeper)
        time.sleep(0.1)
    assert error and err
    out, _, status = spdy_exec(exec_url(server, sleeper, "echo", "still", "here"))
    assert out == b"still here\n" and status == SUCCESS


# -- attach ----------------------------------------------------------------------------------

def test_attach_to_a_running_shell_with_stdin(server: Server, pod: tuple[str, pb.PodSandboxConfig]) -> None:
    cid = container(server, pod, "shell", "sh", stdin=True)
    url = server.runtime.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)).url
    out, err, status = spdy_exec(url, b"echo attached; echo to-stderr >&2; exit 5\n")
    assert (out, err, status) == (b"attached\n", b"to-stderr\n", SUCCESS)
    deadline = time.monotonic() + 10
    while server.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.exit_code != 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_end_of_an_attached_stdin_reaches_the_container(server: Server,
                                                            pod: tuple[str, pb.PodSandboxConfig]) -> None:
    """stdin_once: the first attach's end of input is the container's (`cat` ends, exit 0)."""
    cid = container(server, pod, "cat", "cat", stdin=True, stdin_once=True)
    url = server.runtime.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)).url
    out, _, status = spdy_exec(url, b"once\n")
    assert (out, status) == (b"once\n", SUCCESS)
    deadline = time.monotonic() + 10
    while (s := server.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
           ).state != pb.CONTAINER_EXITED:
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s.exit_code == 0


def test_attach_with_a_tty_over_websocket(server: Server, pod: tuple[str, pb.PodSandboxConfig]) -> None:
    cid = container(server, pod, "tty", "sh", stdin=True, tty=True)
    url = server.runtime.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)).url
    ws = Ws(url, ["v5.channel.k8s.io"])
    try:
        ws.write(4, b'{"Width":120,"Height":40}')
        time.sleep(0.3)
        ws.write(0, b"stty size; exit 0\n")
        out, status = ws.read_all(1), json.loads(ws.read_all(3))
    finally:
        ws.close()
    assert b"40 120" in out and status["status"] == "Success"


# -- port-forward ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web(server: Server, pod: tuple[str, pb.PodSandboxConfig]) -> str:
    container(server, pod, "web", "httpd", "-f", "-p", "80", "-h", "/www")
    time.sleep(0.5)
    return pod[0]


def _get(send, recv) -> bytes:  # noqa: ANN001
    send(b"GET / HTTP/1.0\r\n\r\n")
    return recv()


def test_port_forward_over_spdy_reaches_the_pods_port_80(server: Server, web: str) -> None:
    url = server.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=web, port=[80])).url
    before = _threads(server.proc.pid)
    c = Spdy(url, ("portforward.k8s.io",))
    try:
        assert c.code == 101 and c.headers["x-stream-protocol-version"] == ["portforward.k8s.io"]
        for request in ("1", "2"):  # a pair per connection, as kubectl opens them
            error = c.open(streamType="error", port="80", requestID=request)
            data = c.open(streamType="data", port="80", requestID=request)
            reply = _get(lambda b, d=data: c.write(d, b, fin=True), lambda d=data: c.read_all(d))
            assert reply.startswith(b"HTTP/1.") and reply.endswith(b"stockade\n"), reply
            assert c.read_all(error) == b""
        # finished forwards leave no thread behind while the connection stays (its own two do)
        deadline = time.monotonic() + 10
        while _threads(server.proc.pid) > before + 2:
            assert time.monotonic() < deadline, (_threads(server.proc.pid), before)
            time.sleep(0.1)
        error = c.open(streamType="error", port="81", requestID="3")  # nothing listens there
        data = c.open(streamType="data", port="81", requestID="3")
        assert b"error forwarding port 81" in c.read_all(error)
        assert c.reset.get(data) == spdy.CANCEL
    finally:
        c.close()


def test_port_forward_over_websocket(server: Server, web: str) -> None:
    url = server.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=web, port=[80])).url
    ws = Ws(url, ["v4.channel.k8s.io"], channels=2)
    try:
        assert ws.channels[0].get(timeout=30) == (80).to_bytes(2, "little")
        assert ws.channels[1].get(timeout=30) == (80).to_bytes(2, "little")
        ws.write(0, b"GET / HTTP/1.0\r\n\r\n")
        reply = ws.read_all(0)
    finally:
        ws.close()
    assert reply.endswith(b"stockade\n"), reply


def test_port_forward_with_spdy_tunnelled_in_a_websocket(server: Server, web: str) -> None:
    """SPDY/3.1+portforward.k8s.io: a whole SPDY connection inside binary messages, what kubectl
    1.31+ and crictl's websocket transport send; the ports come in the streams' headers."""
    url = server.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=web)).url
    ws = Ws(url, ["SPDY/3.1+portforward.k8s.io"], channels=0)
    ours, theirs = spdy.Codec(), spdy.Codec()
    try:
        assert ws.protocol == "SPDY/3.1+portforward.k8s.io"
        for frame in (spdy.SynStream(1, {"streamtype": ["error"], "port": ["80"], "requestid": ["0"]}),
                      spdy.SynStream(3, {"streamtype": ["data"], "port": ["80"], "requestid": ["0"]}),
                      spdy.Data(3, b"GET / HTTP/1.0\r\n\r\n", fin=True)):
            ws.send_raw(ours.encode(frame))
        reply, seen, deadline = b"", 0, time.monotonic() + 30
        while not reply.endswith(b"stockade\n"):
            assert time.monotonic() < deadline, (reply, ws.messages)
            for frame in theirs.feed(b"".join(ws.messages[seen:])):
                if isinstance(frame, spdy.Data) and frame.stream_id == 3:
                    reply += frame.data
            seen = len(ws.messages)
            time.sleep(0.05)
    finally:
        ws.close()
    assert reply.startswith(b"HTTP/1.")


# -- bad input -------------------------------------------------------------------------------

def test_tokens_are_single_use_and_unknown_ones_are_404(server: Server, sleeper: str) -> None:
    url = exec_url(server, sleeper, "true")
    assert spdy_exec(url)[2] == SUCCESS
    for bad in (url, url[:-3] + "abc", url.replace("/exec/", "/attach/")):
        sock, code, _, _ = http_head(bad, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                           ("X-Stream-Protocol-Version", "v4.channel.k8s.io")])
        sock.close()
        assert code == 404


def test_a_token_for_a_container_that_is_gone_ends_with_an_error_status(
        server: Server, pod: tuple[str, pb.PodSandboxConfig]) -> None:
    cid = container(server, pod, "short", "sleep", "1000")
    urls = [exec_url(server, cid, "echo", "never"),
            server.runtime.Attach(pb.AttachRequest(container_id=cid, stdout=True, stderr=True)).url]
    server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    for url in urls:
        out, _, status = spdy_exec(url)
        assert out == b"" and status["status"] == "Failure" and status["reason"] == "InternalError", status
        assert f"no container {cid!r}" in status["message"]


def test_streams_of_unknown_or_repeated_types_are_refused(server: Server, sleeper: str) -> None:
    """An exec connection answers only the streams its request needs, once each: others are reset
    (RST_STREAM CANCEL) and the session goes on."""
    c = Spdy(exec_url(server, sleeper, "echo", "fine", stderr=False))
    try:
        kinds = ("bogus", "error", "stdout", "stdout")
        bogus, error, out, again = (c.open(streamType=kind) for kind in kinds)
        assert c.read_all(out) == b"fine\n"
        assert json.loads(c.read_all(error)) == SUCCESS
        assert c.reset.get(bogus) == spdy.CANCEL and c.reset.get(again) == spdy.CANCEL
    finally:
        c.close()


def test_tokens_expire(server: Server) -> None:
    from stockade.cri.streaming import Pending, Tokens

    tokens = Tokens(ttl=0.05, limit=2)
    token = tokens.issue(Pending("exec"))
    time.sleep(0.1)
    assert tokens.take(token, "exec") is None
    tokens.issue(Pending("exec"))
    tokens.issue(Pending("exec"))
    with pytest.raises(Exception, match="waiting for their clients"):
        tokens.issue(Pending("exec"))


def test_bad_requests_are_refused_with_a_status(server: Server, sleeper: str) -> None:
    both = pb.ExecRequest(container_id=sleeper, cmd=["sh"], tty=True, stdout=True, stderr=True)
    code, message = status_code(server.runtime.Exec, both)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tty and stderr" in message
    code, _ = status_code(server.runtime.Exec, pb.ExecRequest(container_id="gone", cmd=["sh"], stdout=True))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = status_code(server.runtime.PortForward, pb.PortForwardRequest(pod_sandbox_id="gone"))
    assert code == grpc.StatusCode.NOT_FOUND
    # no protocol in common: 403, and the server's list
    upgrade = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    sock, status, headers, _ = http_head(exec_url(server, sleeper, "true"),
                                         [*upgrade, ("X-Stream-Protocol-Version", "v9.channel.k8s.io")])
    sock.close()
    assert status == 403 and "v4.channel.k8s.io" in headers["x-accepted-stream-protocol-versions"]
    # an oversized request head: 431
    sock, status, _, _ = http_head(exec_url(server, sleeper, "true"), [("X-Padding", "x" * 20000)])
    sock.close()
    assert status == 431


def test_malformed_frames_and_stream_floods_hurt_no_other_stream(server: Server, sleeper: str,
                                                                  web: str) -> None:
    """While one exec runs, other connections send garbage, an oversized header block, an
    unknown frame type and a flood of streams: each is closed (GOAWAY with PROTOCOL_ERROR, or
    its extra streams refused), the exec finishes as if nothing happened, and no thread, fd or
    process is left behind."""
    pid = server.proc.pid
    threads_before, fds_before = _threads(pid), len(os.listdir(f"/proc/{pid}/fd"))
    result: dict = {}
    slow = exec_url(server, sleeper, "sh", "-c", "sleep 1; echo survived")
    runner = threading.Thread(target=lambda: result.setdefault("r", spdy_exec(slow)))
    runner.start()
    garbage = [
        b"\x00\x00\x00\x01\x00\x00\x00\x03abc",                 # DATA on a stream never opened
        b"\x80\x03\x00\x05\x00\x00\x00\x00",                    # a control type SPDY/3.1 lacks
        b"\x80\x02\x00\x01\x00\x00\x00\x0a" + b"\x00" * 10,      # SPDY/2
        b"\x80\x03\x00\x01\x00\xff\xff\xff",                    # a 16 MiB control frame
        b"\x80\x03\x00\x01\x00\x00\x00\x0e" + bytes(10) + b"\x78\x9c\xff\xff",  # headers not zlib's
    ]
    for frame in garbage:
        c = Spdy(exec_url(server, sleeper, "true"))
        c.sock.sendall(frame)
        assert c.done.wait(10) and c.goaway is not None, frame
        assert c.goaway.status == spdy.GOAWAY_PROTOCOL_ERROR, frame
        c.close()
    flood = Spdy(server.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=web, port=[80])).url,
                 ("portforward.k8s.io",))
    for i in range(300):
        flood.open(streamType="error", port="80", requestID=str(i))
    deadline = time.monotonic() + 10
    while spdy.REFUSED_STREAM not in flood.reset.values():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    flood.close()
    runner.join(30)
    assert result["r"] == (b"survived\n", b"", SUCCESS)
    deadline = time.monotonic() + 10
    while _threads(pid) > threads_before or len(os.listdir(f"/proc/{pid}/fd")) > fds_before:
        assert time.monotonic() < deadline, (_threads(pid), threads_before)
        time.sleep(0.1)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_streaming_over_tls(tmp_path: Path) -> None:
    """[stockade.streaming] tls_cert and tls_key: the URLs are https, and exec works through TLS."""
    import ssl
    import subprocess

    from images import busybox_image as image

    require(shutil.which("openssl"), "openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    base = fast_tmp()
    (base / "images").mkdir(parents=True)
    import_archive(Store(str(base / "images")), str(image(tmp_path / "bb.tar", IMAGE)))
    (base / "stockade.toml").write_text(CONFIG + f'[stockade.streaming]\ntls_cert = "{cert}"\n'
                                                 f'tls_key = "{key}"\n')
    srv = Server(base, config=base / "stockade.toml")
    try:
        cid = container(srv, _pod(srv), "tls", "sleep", "100")
        url = exec_url(srv, cid, "echo", "secure")
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        assert spdy_exec(url, tls=context) == (b"secure\n", b"", SUCCESS)
    finally:
        stop_and_remove(srv)


def _pod(server: Server) -> tuple[str, pb.PodSandboxConfig]:
    meta = pb.PodSandboxMetadata(name="t", namespace="team-a", uid="uid-tls")
    config = pb.PodSandboxConfig(metadata=meta, hostname="t", log_directory=str(server.base / "logs"))
    return server.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id, config


def test_a_streaming_port_in_use_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = fast_tmp()
        (base / "stockade.toml").write_text(CONFIG + f"[stockade.streaming]\nport = {port}\n")
        try:
            with pytest.raises(AssertionError, match=f"cannot serve streaming on 127.0.0.1:{port}"):
                Server(base, config=base / "stockade.toml")
            assert not (base / "cri.sock").exists()
        finally:
            shutil.rmtree(base, ignore_errors=True)

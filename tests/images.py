"""OCI image archives for tests that drive real engines without a registry: a busybox root
filesystem (bundles.make_rootfs) with catatonit as the pod's pause process, packed as an OCI
image layout tar that `ctr images import` reads."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bundles import make_rootfs

CATATONIT = shutil.which("catatonit") or "/usr/bin/catatonit"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_image(archive: Path, name: str, entrypoint: tuple[str, ...] = ("/pause", "-P"),
                  hardlinks: bool = False) -> Path:
    """ARCHIVE: an image NAME with busybox in /bin, catatonit at /pause and /www/index.html; its
    entrypoint `/pause -P` waits for a signal (the pod sandbox's pause process; containers give a
    command). HARDLINKS: applets hardlinked, as the official busybox image has them (masking
    /bin/ls then does not mask the shell)."""
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = make_rootfs(Path(tmp) / "rootfs")
        if hardlinks:
            for path in (rootfs / "bin").iterdir():
                if path.is_symlink():
                    path.unlink()
                    os.link(rootfs / "bin/busybox", path)
        shutil.copy2(CATATONIT, rootfs / "pause")
        (rootfs / "www").mkdir()
        (rootfs / "www/index.html").write_text("stockade\n")
        layer = tar_of(rootfs)
    config = {"Env": [PATH_ENV], "Entrypoint": list(entrypoint), "WorkingDir": "/"}
    return oci_archive(archive, name, [(layer, "")], config)


LAYER = "application/vnd.oci.image.layer.v1.tar"


def oci_archive(archive: Path, name: str, layers: list[tuple[bytes, str]], config: dict,
                index_platforms: tuple[str, ...] = ()) -> Path:
    """ARCHIVE: an OCI image layout tar holding image NAME: LAYERS as (uncompressed tar,
    compression "", "gzip" or "zstd"), CONFIG the image config's `config`. With INDEX_PLATFORMS
    the name points at a nested index listing the image for each "os/arch" given (the same
    image for each: enough to test platform selection)."""
    blobs: dict[str, bytes] = {}
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw) for raw, _ in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _add(blobs, _json(image_config), "application/vnd.oci.image.config.v1+json"),
        "layers": [_add(blobs, _compress(raw, how), LAYER + f"+{how}" * bool(how)) for raw, how in layers],
    }
    entry = _add(blobs, _json(manifest), manifest["mediaType"])
    if index_platforms:
        entries = []
        for platform in index_platforms:
            os_name, arch = platform.split("/")
            entries.append({**entry, "platform": {"os": os_name, "architecture": arch}})
        index_type = "application/vnd.oci.image.index.v1+json"
        nested = {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}
        entry = _add(blobs, _json(nested), nested["mediaType"])
    entry["annotations"] = {"io.containerd.image.name": name}
    index = {"schemaVersion": 2, "manifests": [entry]}
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": _json(index)}
    files.update({f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()})
    with tarfile.open(archive, "w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        import gzip

        return gzip.compress(raw)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw)
    return raw


def tar_of(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    return buf.getvalue()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict:
    blobs[_digest(data)] = data
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}


def layer_tar(*files: tuple[str, bytes]) -> bytes:
    """An uncompressed layer tar of regular files (name, content), mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def concurrently(fn, times: int) -> list[BaseException]:  # noqa: ANN001 - any callable
    """Run FN in TIMES threads at once; the exceptions they raised."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


class TokenServer:
    """A registry token service (distribution's `auth: token`) on a loopback port, for tests to run
    themselves: GET /token?service=..&scope=repository:NAME:pull[,push] answers an RS256 JWT signed
    with a key and self-signed certificate that openssl makes in BASE (the registry's
    rootcertbundle). Basic USER:PASSWORD gets pull and push on every repository, an anonymous
    request only pull on repositories under public/, wrong credentials a 401. `requests` lists
    every (scope, user or "") asked for, in order."""

    SERVICE = "stockade-test-registry"
    ISSUER = "stockade-test-token-server"
    LIFETIME = 300

    def __init__(self, base: Path, user: str = "tester", password: str = "s3cret pass") -> None:
        self.user, self.password = user, password
        self.key, self.cert = base / "token.key", base / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=stockade test token issuer", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=60)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True, timeout=60).stdout
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, name="token-server", daemon=True)
        self.thread.start()

    def count(self, scope: str) -> int:
        with self.lock:
            return sum(1 for asked, _ in self.requests if asked == scope)

    def grant(self, user: str, scopes: list[str]) -> list[dict]:
        """The access USER ("" anonymous) gets for SCOPES (what is not allowed is left out)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            allowed = {"pull", "push"} if user else {"pull"} if name.startswith("public/") else set()
            granted = [a for a in actions.split(",") if a in allowed]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def token(self, user: str, service: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": user, "aud": service, "exp": now + self.LIFETIME,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signed = f"{_b64url(_json(header))}.{_b64url(_json(claims))}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signed.encode(), check=True, capture_output=True, timeout=60).stdout
        return f"{signed}.{_b64url(signature)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _token_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            url = urlsplit(self.path)
            if url.path != "/token":
                return self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            query = parse_qs(url.query)
            scopes = query.get("scope", [])
            user = ""
            if "authorization" in self.headers:
                kind, _, encoded = self.headers["authorization"].partition(" ")
                name, _, password = base64.b64decode(encoded).decode(errors="replace").partition(":")
                if kind.lower() != "basic" or (name, password) != (server.user, server.password):
                    refusal = {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
                    return self._reply(401, refusal)
                user = name
            with server.lock:
                server.requests.append((" ".join(scopes), user))
            token = server.token(user, query.get("service", [""])[0], server.grant(user, scopes))
            return self._reply(200, {"token": token, "access_token": token, "expires_in": server.LIFETIME})

        def _reply(self, status: int, body: dict) -> None:
            data = _json(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
            pass

    return Handler


class Registry:
    """Debian's docker-registry on a loopback port, storing in BASE; with TOKEN_AUTH it wants
    bearer tokens from that token server (pushes then log in as its user)."""

    def __init__(self, base: Path, token_auth: TokenServer | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.data = base / "data"
        self.token_auth = token_auth
        config = base / "config.yml"
        auth = (
            f"auth:\n  token:\n    realm: {token_auth.realm}\n    service: {token_auth.SERVICE}\n"
            f"    issuer: {token_auth.ISSUER}\n    rootcertbundle: {token_auth.cert}\n"
        ) if token_auth else ""
        config.write_text(
            f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.data}\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self.log = base / "registry.log"
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=open(self.log, "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def push(self, archive: Path, name: str) -> None:
        command = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{archive}",
                   f"docker://{self.host}/{name}"]
        if self.token_auth:
            command[2:2] = ["--dest-creds", f"{self.token_auth.user}:{self.token_auth.password}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    def blob_gets(self) -> list[str]:
        return re.findall(r"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64})", self.log.read_text(errors="replace"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

"""A registry client (OCI distribution spec) over httpx, and `pull` into the store.

HTTPS by default, plain HTTP only for registries the operator marks insecure. Authentication
answers the registry's `WWW-Authenticate` challenge: a bearer token fetched from its realm
(anonymously, or with the registry's credentials from a docker-style auth.json) and cached per
scope, or basic auth. Redirects (blob storage) are followed by hand, so `Authorization` never
goes to another host. 429 and 5xx are retried with backoff; a deadline bounds the whole pull.
Every byte is verified: the manifest against its digest, each blob as the store keeps it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
from urllib.parse import urlencode, urljoin, urlsplit

from ..errors import SpecError
from . import manifest
from .reference import DEFAULT_DOMAIN, Reference, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from .store import Image, Store

    # (blob digest, phase: "fetch" | "fetched" | "unpacked", bytes done, bytes in all)
    Progress = Callable[[str, str, int, int], None]

DOCKER_HUB = "registry-1.docker.io"
RETRIES = 4
PARALLEL = 3  # layers fetched and unpacked at once (skopeo fetches up to 6)
AUTH_FILES = ("${REGISTRY_AUTH_FILE}", "/run/containers/0/auth.json", "~/.docker/config.json")


class RegistryError(SpecError):
    """The registry could not give what was asked (down, refused, garbage, not found)."""

    status = 0  # the HTTP status that said so, when one did


class DeadlineExceeded(RegistryError):
    """The pull's deadline passed."""


class Client:
    def __init__(self, insecure: set[str] | None = None, auth_file: str | None = None,
                 timeout: float = 30.0, deadline: float = 3600.0,
                 credentials: dict[str, tuple[str, str]] | None = None,
                 registry_tokens: dict[str, str] | None = None,
                 mirrors: dict[str, str] | None = None) -> None:
        """CREDENTIALS (host -> user, password) come before the auth file's; REGISTRY_TOKENS
        (host -> bearer token, as a CRI PullImage may carry) are sent as they are. MIRRORS
        (registry -> host): asked first, the registry itself when the mirror fails or lacks it
        (containerd's order); the image keeps its name."""
        import httpx

        self.insecure = set(insecure or ())
        self.mirrors = dict(mirrors or {})
        given = {_auth_key(host): pair for host, pair in (credentials or {}).items()}
        self.credentials = {**_credentials(auth_file), **given}
        self.tokens: dict[tuple[str, str], str] = {
            (_auth_key(h), ""): f"Bearer {t}" for h, t in (registry_tokens or {}).items()}
        self.deadline = time.monotonic() + deadline
        self.http = httpx.Client(timeout=timeout, follow_redirects=False,
                                 headers={"User-Agent": "stockade/0.1"})

    def close(self) -> None:
        self.http.close()

    # -- what pull needs

    def manifest(self, ref: Reference, reference: str | None = None) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of REF's manifest (or of REFERENCE: a digest)."""
        wanted = reference or ref.digest or ref.tag
        r = self._get(ref, f"/v2/{ref.path}/manifests/{wanted}", {"Accept": manifest.ACCEPT})
        try:
            data = _read_limited(r, manifest.MAX_DOCUMENT, f"{ref} manifest")
        finally:
            r.close()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if wanted.startswith("sha256:") and digest != wanted:
            raise RegistryError(f"manifest {wanted} of {ref.name} has content {digest}", where=str(ref))
        return data, r.headers.get("content-type", "").split(";")[0].strip(), digest

    def blob(self, ref: Reference, desc: manifest.Descriptor, store: Store,
             progress: Progress | None = None) -> None:
        """Fetch a blob into the store, once however many pulls want it at the same time."""
        with store.blob_lock(desc.digest):
            if not store.has_blob(desc.digest):
                r = self._get(ref, f"/v2/{ref.path}/blobs/{desc.digest}", {})
                try:
                    store.put_blob(desc.digest, _Reader(r, desc, progress, self.deadline), desc.size)
                finally:
                    r.close()
        if progress:
            progress(desc.digest, "fetched", desc.size, desc.size)

    # -- HTTP with auth, redirects and retries

    def _get(self, ref: Reference, path: str, headers: dict[str, str]) -> httpx.Response:
        mirror = self.mirrors.get(ref.domain)
        if mirror:
            try:
                return self._get_from(mirror, ref, path, headers)
            except RegistryError as exc:
                if isinstance(exc, DeadlineExceeded):
                    raise
        return self._get_from(DOCKER_HUB if ref.domain == DEFAULT_DOMAIN else ref.domain, ref, path, headers)

    def _get_from(self, host: str, ref: Reference, path: str, headers: dict[str, str]) -> httpx.Response:
        domain = ref.domain if host in (ref.domain, DOCKER_HUB) else host
        scheme = "http" if domain in self.insecure else "https"
        url = f"{scheme}://{host}{path}"
        scope = f"repository:{ref.path}:pull"
        for attempt in range(RETRIES):
            r = self._send(url, host, headers, scope)
            if r.status_code == 401 and self._authenticate(r, host, scope):
                r.close()
                r = self._send(url, host, headers, scope)
            if r.status_code in (429, 500, 502, 503, 504) and attempt < RETRIES - 1:
                r.close()
                time.sleep(min(0.25 * 2**attempt, max(0.0, self.deadline - time.monotonic())))
                continue
            if r.status_code == 200:
                return r
            body = r.read()[:300].decode(errors="replace")
            r.close()
            error = RegistryError(f"{ref.name}: GET {path} answered {r.status_code}: {_message(body)}",
                                  where=str(ref), hint=_hint(r.status_code))
            error.status = r.status_code
            raise error
        raise AssertionError("unreachable")

    def _send(self, url: str, host: str, headers: dict[str, str], scope: str) -> httpx.Response:
        import httpx

        for _ in range(5):  # redirects, by hand: credentials only for the registry itself
            if time.monotonic() > self.deadline:
                raise DeadlineExceeded("the pull's deadline passed", where=url)
            same = urlsplit(url).netloc == host
            auth = self._authorization(host, scope) if same else {}
            try:
                request = self.http.build_request("GET", url, headers={**headers, **auth})
                r = self.http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise RegistryError(f"cannot reach {urlsplit(url).netloc}: {exc}", where=url,
                                    hint="is the registry up? plain HTTP needs --insecure-registry") from None
            if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                url = urljoin(url, r.headers["location"])
                r.close()
                continue
            return r
        raise RegistryError("too many redirects", where=url)

    def _authorization(self, host: str, scope: str) -> dict[str, str]:
        token = self.tokens.get((host, scope)) or self.tokens.get((host, ""))
        if token:
            return {"Authorization": token}
        return {}

    def _authenticate(self, r: httpx.Response, host: str, scope: str) -> bool:
        """Answer a 401's challenge once; False when there is nothing to answer with."""
        import httpx

        self.tokens.pop((host, scope), None)  # the token we sent was refused (expired): ask again
        kind, params = _challenge(r.headers.get("www-authenticate", ""))
        user = self.credentials.get(host)
        if kind == "basic" and user:
            self.tokens[(host, "")] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
            return True
        if kind != "bearer" or "realm" not in params:
            return False
        query = {"service": params.get("service", host), "scope": params.get("scope", scope)}
        realm = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        headers = {}
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        try:
            token_reply = self.http.get(realm, headers=headers)
        except httpx.HTTPError as exc:
            raise RegistryError(f"{host}: cannot reach the token service: {exc}", where=realm) from None
        if token_reply.status_code != 200:
            answer = f"{token_reply.status_code} for {query['scope']}: {_message(token_reply.text[:300])}"
            raise RegistryError(f"{host}: the token service answered {answer}", where=realm,
                                hint="check the credentials in the auth file")
        try:
            body = token_reply.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{host}: the token service gave no token", where=realm)
        self.tokens[(host, scope)] = f"Bearer {token}"
        return True


def pull(
    store: Store, text: str, client: Client | None = None, arch: str = "amd64",
    progress: Progress | None = None,
) -> tuple[Image, list[str]]:
    """Fetch REF's image for linux/ARCH into STORE (what is there already is not fetched again).
    Layers are fetched and unpacked at the same time (PARALLEL at once); PROGRESS hears of each
    blob's bytes and of each layer unpacked."""
    ref = parse(text)
    own = client is None
    client = client or Client()
    try:
        data, media_type, digest = client.manifest(ref)
        doc = manifest.load(data, str(ref))
        if manifest.kind(doc, media_type, str(ref)) in manifest.INDEXES:
            picked = manifest.pick(doc, str(ref), arch=arch)
            data, media_type, digest = client.manifest(ref, picked.digest)
            doc = manifest.load(data, str(ref))
        m = manifest.manifest(doc, digest)
        with store.adding():
            return _fetch(client, ref, store, m, (data, media_type, digest), progress)
    finally:
        if own:
            client.close()


def _fetch(client: Client, ref: Reference, store: Store, m: manifest.Manifest,
           doc: tuple[bytes, str, str], progress: Progress | None) -> tuple[Image, list[str]]:
    """The config, then the layers, then the image's record."""
    data, media_type, digest = doc
    client.blob(ref, m.config, store)
    config = manifest.config(manifest.load(store.read_blob(m.config.digest), m.config.digest),
                             m.config.digest)
    if len(config.diff_ids) != len(m.layers):
        raise SpecError(f"{len(m.layers)} layers but {len(config.diff_ids)} diff ids", where=digest)
    notes = _layers(client, ref, store, list(zip(m.layers, config.diff_ids, strict=True)), progress)
    store.put_blob(digest, io.BytesIO(data), len(data))
    names = [str(Reference(ref.domain, ref.path, ref.tag))] if ref.tag else []
    image, more = store.add(data, names, media_type)
    return image, notes + more


def _layers(client: Client, ref: Reference, store: Store,
            layers: list[tuple[manifest.Descriptor, str]], progress: Progress | None) -> list[str]:
    """Fetch and unpack each layer in a pool of threads (the downloads wait on the network, the
    unpacking on zlib/zstd and the disk, all without the GIL); the first failure stops the rest."""
    from concurrent.futures import ThreadPoolExecutor

    def one(layer: manifest.Descriptor, diff_id: str) -> list[str]:
        client.blob(ref, layer, store, progress)
        notes = store.unpack(layer, diff_id)
        if progress:
            progress(layer.digest, "unpacked", layer.size, layer.size)
        return notes

    pool = ThreadPoolExecutor(max_workers=max(1, min(PARALLEL, len(layers))))
    try:
        futures = [pool.submit(one, layer, diff_id) for layer, diff_id in layers]
        return [note for f in futures for note in f.result()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Reader:
    """A streamed response body as a file for store.put_blob."""

    def __init__(self, r: httpx.Response, desc: manifest.Descriptor | None = None,
                 progress: Progress | None = None, deadline: float = float("inf")) -> None:
        self.chunks = r.iter_bytes(1 << 20)
        self.pending = b""
        self.desc, self.progress, self.count, self.deadline = desc, progress, 0, deadline

    def read(self, n: int = -1) -> bytes:
        while len(self.pending) < max(n, 1):
            if time.monotonic() > self.deadline:  # a registry that trickles: the pull still ends
                where = self.desc.digest if self.desc else ""
                raise DeadlineExceeded("the pull's deadline passed", where=where)
            chunk = next(self.chunks, b"")
            if not chunk:
                break
            self.pending += chunk
            self.count += len(chunk)
            if self.progress and self.desc:
                self.progress(self.desc.digest, "fetch", self.count, self.desc.size)
        out, self.pending = (self.pending, b"") if n < 0 else (self.pending[:n], self.pending[n:])
        return out


def _read_limited(r: httpx.Response, limit: int, what: str) -> bytes:
    data = b""
    for chunk in r.iter_bytes():
        data += chunk
        if len(data) > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes", where=what)
    return data


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    key, value, in_quotes, current = "", "", False, ""
    for ch in rest + ",":
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == "=" and not in_quotes and not key:
            key, current = current.strip(), ""
        elif ch == "," and not in_quotes:
            value, current = current.strip(), ""
            if key:
                params[key.lower()] = value
            key = ""
        else:
            current += ch
    return kind.lower(), params


def _credentials(path: str | None) -> dict[str, tuple[str, str]]:
    """host -> (user, password) from a docker-style auth file (the first that exists)."""
    candidates = [path] if path else [os.path.expanduser(os.path.expandvars(p)) for p in AUTH_FILES]
    for candidate in candidates:
        if not candidate or candidate.startswith("$") or not os.path.isfile(candidate):
            continue
        try:
            with open(candidate) as f:
                auths = json.load(f).get("auths") or {}
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read the auth file: {exc}", where=candidate) from None
        out = {}
        for host, entry in auths.items():
            encoded = (entry or {}).get("auth")
            if encoded:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
                out[_auth_key(host)] = (user, password)
        return out
    return {}


def _auth_key(key: str) -> str:
    """The registry host an auth file's key names: podman writes `host[:port]`, docker login a URL
    (`https://index.docker.io/v1/` for Docker Hub)."""
    netloc = urlsplit(key if "//" in key else "//" + key).netloc or key
    return DOCKER_HUB if netloc in (DEFAULT_DOMAIN, "index.docker.io") else netloc


def _message(body: str) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or body
    except (ValueError, AttributeError):
        return body.strip() or "(no body)"


def _hint(status: int) -> str:
    return {
        401: "the registry wants credentials: log in (auth.json) or check the name",
        403: "the registry refused: check the credentials' rights",
        404: "no such image or tag in that registry",
    }.get(status, "")

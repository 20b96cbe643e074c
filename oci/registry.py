"""Pull and push images over the OCI distribution API (registry v2), standard library only.

Transport choices follow Docker: loopback registries speak plain HTTP; registries listed as
insecure are tried over HTTPS without certificate checks and fall back to HTTP; everything
else is HTTPS with verification. Authentication follows the registry's 401 challenge:
Bearer (token service, Docker token spec, OAuth2 refresh tokens for identity tokens) or Basic.

Pulls go through mirrors when the client has some for the image's registry (containerd's
hosts.toml and CRI-O's registries.conf offer the same): each mirror is asked for the same
repository and tag or digest, in order, then the registry itself; the image is recorded under the
name that was asked for. A mirror never gets the caller's credentials (they are the registry's),
and a pull by digest is checked against that digest whichever host served it.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import ssl
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Protocol

from .digest import digest_of, split_digest
from .errors import DigestMismatch, ImageError, ImageNotFound, RegistryError
from .reference import Reference, is_loopback_host, split_host_port
from .store import (DEFAULT_PLATFORM, INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE,
                    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
                    MEDIA_TYPE_OCI_MANIFEST, Descriptor, ImageRecord, ImageStore, Platform,
                    detect_media_type, parse_index, parse_manifest, select_platform)

USER_AGENT = "pyshim-oci/0.1"
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_API_HOST = "registry-1.docker.io"
_MANIFEST_ACCEPT = ", ".join([MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST,
                              MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST])
_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 << 10
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_HTTP_BLOCKSIZE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """Registry credentials, field for field what CRI's AuthConfig carries."""
    username: str = ""
    password: str = ""
    auth: str = ""            # base64("user:password"), as in Docker's config.json
    identity_token: str = ""  # OAuth2 refresh token, exchanged at the token service
    registry_token: str = ""  # a bearer token to present to the registry as-is

    def basic_pair(self, registry: str) -> tuple[str, str] | None:
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                decoded = base64.b64decode(self.auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ImageError(f"credentials for {registry}: 'auth' is not base64 of "
                                 f"user:password: {exc}") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ImageError(f"credentials for {registry}: 'auth' decodes to no user:password pair")
            return user, password
        return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


_AUTH_TOKEN_RE = re.compile(
    r'\s*,?\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?')


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse `Bearer realm="...",service="...",scope="..."` (possibly several challenges)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _AUTH_TOKEN_RE.match(header, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        name, value = m.group(1), m.group(2)
        if value is None:
            challenges.append(Challenge(name.lower(), {}))
        elif challenges:
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            challenges[-1].params[name.lower()] = value
    return challenges


@dataclass
class _Endpoint:
    scheme: str          # "http" or "https"
    netloc: str          # host[:port] the API is served from
    verify_tls: bool = True
    may_fall_back_to_http: bool = False


class RegistryClient:
    def __init__(self, insecure_registries: tuple[str, ...] = (), timeout: float = 60,
                 platform: Platform = DEFAULT_PLATFORM, max_parallel_downloads: int = 3,
                 mirrors: dict[str, tuple[str, ...]] | None = None):
        self.insecure_registries = tuple(insecure_registries)
        # registry host -> mirror hosts (host[:port]) tried before it, in order; pulls only.
        self.mirrors = {registry: tuple(hosts) for registry, hosts in (mirrors or {}).items()}
        self.timeout = timeout
        self.platform = platform
        self.max_parallel_downloads = max(1, max_parallel_downloads)

    # ------------------------------------------------------------ pull

    def pull(self, store: ImageStore, ref: str, auth: Credentials | None = None,
             on_step: Callable[..., None] | None = None, blob_tap: BlobTapFactory | None = None) -> ImageRecord:
        """Pull `ref` into `store`. `on_step(step, **facts)` is told each step before it is taken
        (a caller journals them to recover from a crash mid-pull):
          "blobs"        new_blobs: the comma-separated digests this pull will add to the store
          "blob_partial" a blob's first chunk is in a temporary file (once per blob)
          "record"       every blob is stored; the image is about to be recorded
        `blob_tap(annotations, layers, descriptor)` may return a BlobTap for a layer about to be
        downloaded: it sees the blob's bytes as they arrive (e.g. to unpack them in the same pass).
        """
        announce = on_step or (lambda step, **facts: None)
        reference = Reference.parse(ref)
        session, top = self._resolve(reference, auth)
        if reference.digest and top.digest != reference.digest:
            raise DigestMismatch(f"manifest of {reference}", reference.digest, top.digest)

        annotations: dict[str, str] = {}
        manifest_raw = top.raw
        if top.media_type in INDEX_MEDIA_TYPES:
            index = parse_index(top.raw, f"index of {reference}")
            chosen = select_platform(index, self.platform, f"index of {reference}")
            annotations = {**index.annotations, **chosen.annotations}
            child = session.fetch_manifest(chosen.digest)
            if child.digest != chosen.digest:
                raise DigestMismatch(f"{self.platform} manifest of {reference}", chosen.digest, child.digest)
            manifest_raw = child.raw
        elif top.media_type not in MANIFEST_MEDIA_TYPES:
            raise ImageError(f"{reference}: registry returned a {top.media_type!r}, which is not "
                             "a container image")
        manifest = parse_manifest(manifest_raw, f"manifest of {reference}")

        wanted = [digest_of(manifest_raw), manifest.config.digest, *(d.digest for d in manifest.layers)]
        announce("blobs", new_blobs=",".join(d for d in dict.fromkeys(wanted) if not store.has_blob(d)))
        all_annotations = {**annotations, **manifest.annotations}
        taps = (lambda d: blob_tap(all_annotations, manifest.layers, d)) if blob_tap else None
        session.fetch_blobs(store, [manifest.config, *manifest.layers],
                            on_partial=(lambda: announce("blob_partial")) if on_step else None, taps=taps)
        config_raw = store.read_blob(manifest.config.digest)
        tags = [str(reference.with_tag(reference.tag))] if reference.tag else []
        repo_digests = [f"{reference.name}@{top.digest}"]
        announce("record")
        return store.add_image(manifest_raw, config_raw, tags, repo_digests, annotations)

    def _resolve(self, reference: Reference, auth: Credentials | None) -> tuple["_Session", "_FetchedManifest"]:
        """The first host (mirrors in order, then the registry) that serves the reference's
        manifest, and that manifest. A mirror that is down or lacks the image is passed over;
        when every host fails, the registry's own error is raised, naming the mirrors tried."""
        wanted = reference.digest or reference.tag
        passed_over: list[str] = []
        for mirror in self.mirrors.get(reference.registry, ()):
            session = _Session(self, reference, None, actions="pull", host=mirror)
            try:
                return session, session.fetch_manifest(wanted)
            except (ImageNotFound, RegistryError) as exc:
                passed_over.append(f"mirror {mirror}: {exc}")
        session = _Session(self, reference, auth, actions="pull")
        try:
            return session, session.fetch_manifest(wanted)
        except ImageNotFound as exc:
            if passed_over:
                raise ImageNotFound(str(reference), "; ".join([exc.detail, *passed_over])) from exc
            raise
        except RegistryError as exc:
            if passed_over:
                raise RegistryError(exc.registry, exc.repository, exc.step, exc.status,
                                    "; ".join(d for d in [exc.detail, *passed_over] if d)) from exc
            raise

    # ------------------------------------------------------------ push

    def push(self, store: ImageStore, image: ImageRecord, target_ref: str,
             auth: Credentials | None = None) -> str:
        """Upload the image's blobs (skipping those the registry has) and its manifest.

        Returns the manifest digest the registry confirmed.
        """
        manifest_raw = store.manifest_bytes(image)
        manifest = parse_manifest(manifest_raw, f"manifest of {image.id}")
        sources = {d.digest: _file_opener(store.blob_path(d.digest)) for d in [*manifest.layers, manifest.config]}
        media_type = image.manifest_media_type or detect_media_type(manifest_raw)
        return self.push_blobs(target_ref, manifest_raw, media_type, sources, auth)

    def push_blobs(self, target_ref: str, manifest_raw: bytes, media_type: str,
                   sources: dict[str, Callable[[], BinaryIO]], auth: Credentials | None = None) -> str:
        """Upload the blobs `manifest_raw` names, each read from `sources[digest]()` (a fresh stream of
        exactly the descriptor's size), skipping those the registry has, then the manifest.

        No image store is needed: a checkpoint image is pushed straight from its archive file. The
        registry checks every blob against its digest. Returns the manifest digest it confirmed.
        """
        target = Reference.parse(target_ref)
        session = _Session(self, target, auth, actions="pull,push")
        manifest = parse_manifest(manifest_raw, f"manifest for {target_ref}")
        for descriptor in [*manifest.layers, manifest.config]:
            if descriptor.digest not in sources:
                raise ImageError(f"push to {target_ref}: no content given for blob {descriptor.digest}")
            if not session.blob_exists(descriptor.digest):
                session.upload_blob(descriptor, sources[descriptor.digest])
        return session.put_manifest(target.tag or target.digest, manifest_raw, media_type)

    def check_push_access(self, target_ref: str, auth: Credentials | None = None) -> None:
        """Raise RegistryError unless the registry takes uploads to `target_ref`'s repository.

        Starts an upload and cancels it, so that a move can learn before it stops anything that
        the registry is unreachable or refuses its credentials."""
        session = _Session(self, Reference.parse(target_ref), auth, actions="pull,push")
        session.probe_upload()

    # ------------------------------------------------------------ endpoints

    def endpoint_for(self, registry: str) -> _Endpoint:
        netloc = _DOCKER_HUB_API_HOST if registry == _DOCKER_HUB else registry
        host = split_host_port(registry)[0]
        if is_loopback_host(host):
            return _Endpoint("http", netloc)
        if registry in self.insecure_registries or host in self.insecure_registries:
            return _Endpoint("https", netloc, verify_tls=False, may_fall_back_to_http=True)
        return _Endpoint("https", netloc)


@dataclass
class _FetchedManifest:
    raw: bytes
    digest: str
    media_type: str


@dataclass
class _Response:
    """An open HTTP response; closing it closes its connection (one connection per request)."""
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    url: str

    @property
    def status(self) -> int:
        return self.resp.status

    def header(self, name: str) -> str:
        return self.resp.getheader(name) or ""

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Body = bytes | Callable[[], BinaryIO] | None


class _AfterFirstChunk:
    """A download stream that calls `hook` once, when asked for the second chunk: by then the first
    is in the store's temporary file, the state a crash mid-download leaves."""

    def __init__(self, raw: BinaryIO, hook: Callable[[], None]):
        self._raw, self._hook, self._reads = raw, hook, 0

    def read(self, *size: int) -> bytes:
        # read() as the wrapped stream reads it: HTTPResponse.read(-1) is not read().
        self._reads += 1
        if self._reads == 2:
            self._hook()
        return self._raw.read(*size)


class BlobTap(Protocol):
    """Sees a blob's bytes as they are downloaded (RegistryClient.pull's blob_tap)."""

    def write(self, chunk: bytes) -> None: ...

    def complete(self) -> object:
        """The blob is in the store, verified against its digest."""

    def abort(self) -> None:
        """The download failed; nothing of it will be stored."""


BlobTapFactory = Callable[[dict, list, Descriptor], "BlobTap | None"]


class TeeReader:
    """A download stream whose every chunk a tap (anything with `write`) sees too, in order, once read."""

    def __init__(self, raw: BinaryIO, tap: "BlobTap"):
        self._raw, self._tap = raw, tap

    def read(self, *size: int) -> bytes:
        chunk = self._raw.read(*size)
        if chunk:
            self._tap.write(chunk)
        return chunk


@dataclass
class _Session:
    """One repository at one registry: endpoint, credentials and the current Authorization."""
    client: RegistryClient
    reference: Reference
    credentials: Credentials | None
    actions: str
    host: str = ""  # a mirror serving the reference's registry; "" = the registry itself
    endpoint: _Endpoint = field(init=False)
    _authorization: str = field(init=False, default="")
    _auth_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.endpoint = self.client.endpoint_for(self.registry)
        if self.credentials and self.credentials.registry_token:
            self._authorization = f"Bearer {self.credentials.registry_token}"
        if self.endpoint.may_fall_back_to_http:
            self._choose_insecure_scheme()

    @property
    def registry(self) -> str:
        return self.host or self.reference.registry

    @property
    def repository(self) -> str:
        return self.reference.repository

    def _error(self, step: str, status: int | None = None, detail: str = "") -> RegistryError:
        return RegistryError(self.registry, self.repository, step, status, detail)

    # ------------------------------------------------------------ API operations

    def fetch_manifest(self, ref: str) -> _FetchedManifest:
        step = f"fetch manifest {ref}"
        path = f"/v2/{self.repository}/manifests/{ref}"
        try:
            resp = self.request("GET", path, step, {"Accept": _MANIFEST_ACCEPT})
        except RegistryError as exc:
            if exc.status == 404:
                raise ImageNotFound(str(self.reference), f"registry {self.registry} has no manifest "
                                    f"{ref} in repository {self.repository}") from exc
            raise
        with resp:
            raw = resp.read(MAX_MANIFEST_SIZE + 1)
            if len(raw) > MAX_MANIFEST_SIZE:
                raise self._error(step, resp.status, f"manifest larger than {MAX_MANIFEST_SIZE} bytes")
            content_type = resp.header("Content-Type").split(";")[0].strip()
            claimed = resp.header("Docker-Content-Digest")
        # A manifest fetched by digest is hashed with that digest's algorithm, else sha256.
        algorithm = split_digest(ref)[0] if ":" in ref else "sha256"
        digest = digest_of(raw, algorithm)
        if claimed and claimed.startswith(f"{algorithm}:") and claimed != digest:
            raise DigestMismatch(f"manifest {ref} from {self.registry}/{self.repository}", claimed, digest)
        media_type = detect_media_type(raw, content_type, f"manifest {ref} of {self.reference}")
        return _FetchedManifest(raw, digest, media_type)

    def fetch_blobs(self, store: ImageStore, descriptors: list[Descriptor],
                    on_partial: Callable[[], None] | None = None,
                    taps: Callable[[Descriptor], BlobTap | None] | None = None) -> None:
        missing = list({d.digest: d for d in descriptors if not store.has_blob(d.digest)}.values())
        if len(missing) <= 1 or self.client.max_parallel_downloads == 1:
            for d in missing:
                self.fetch_blob(store, d, on_partial, taps)
            return
        workers = min(self.client.max_parallel_downloads, len(missing))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blob-fetch") as pool:
            for future in [pool.submit(self.fetch_blob, store, d, on_partial, taps) for d in missing]:
                future.result()

    def fetch_blob(self, store: ImageStore, descriptor: Descriptor,
                   on_partial: Callable[[], None] | None = None,
                   taps: Callable[[Descriptor], BlobTap | None] | None = None) -> None:
        step = f"fetch blob {descriptor.digest}"
        with self.request("GET", f"/v2/{self.repository}/blobs/{descriptor.digest}", step,
                          follow_redirects=True) as resp:
            stream = _AfterFirstChunk(resp.resp, on_partial) if on_partial else resp.resp
            tap = taps(descriptor) if taps else None
            try:
                store.write_blob(TeeReader(stream, tap) if tap else stream, descriptor.digest, descriptor.size)
            except BaseException as exc:
                if tap:
                    tap.abort()
                if isinstance(exc, (OSError, http.client.HTTPException)):
                    raise self._error(step, resp.status, f"download interrupted: {exc}") from exc
                raise
            if tap:
                tap.complete()

    def blob_exists(self, digest: str) -> bool:
        step = f"check blob {digest}"
        with self.request("HEAD", f"/v2/{self.repository}/blobs/{digest}", step,
                          expected=(200, 404), follow_redirects=True) as resp:
            return resp.status == 200

    def upload_blob(self, descriptor: Descriptor, open_source: Callable[[], BinaryIO]) -> None:
        step = f"start upload of blob {descriptor.digest}"
        with self.request("POST", f"/v2/{self.repository}/blobs/uploads/", step,
                          {"Content-Length": "0"}, body=b"", expected=(202,)) as resp:
            location = resp.header("Location")
        if not location:
            raise self._error(step, 202, "no Location header for the upload")
        url = urllib.parse.urljoin(self._base_url(), location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": descriptor.digest})
        with self.request("PUT", url, f"upload blob {descriptor.digest}",
                          {"Content-Type": "application/octet-stream",
                           "Content-Length": str(descriptor.size)},
                          body=open_source, expected=(201, 204)):
            pass

    def probe_upload(self) -> None:
        step = "start a test upload (push access check)"
        with self.request("POST", f"/v2/{self.repository}/blobs/uploads/", step,
                          {"Content-Length": "0"}, body=b"", expected=(202,)) as resp:
            location = resp.header("Location")
        if location:
            url = urllib.parse.urljoin(self._base_url(), location)
            # Cancelling is a courtesy: a registry that keeps the empty upload until it expires is fine.
            try:
                with self.request("DELETE", url, "cancel the test upload", expected=(204, 200, 202, 404, 405)):
                    pass
            except RegistryError:
                pass

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        step = f"put manifest {ref}"
        with self.request("PUT", f"/v2/{self.repository}/manifests/{ref}", step,
                          {"Content-Type": media_type, "Content-Length": str(len(raw))},
                          body=raw, expected=(201, 200)) as resp:
            confirmed = resp.header("Docker-Content-Digest")
        digest = digest_of(raw)
        if confirmed and confirmed != digest:
            raise DigestMismatch(f"manifest pushed to {self.registry}/{self.repository}", digest, confirmed)
        return digest

    # ------------------------------------------------------------ HTTP with auth and redirects

    def _base_url(self) -> str:
        return f"{self.endpoint.scheme}://{self.endpoint.netloc}"

    def request(self, method: str, path_or_url: str, step: str, headers: dict | None = None,
                body: Body = None, expected: tuple[int, ...] = (200,),
                follow_redirects: bool = False) -> _Response:
        """Send a request, answering one auth challenge and following redirects; raise on bad status."""
        url = urllib.parse.urljoin(self._base_url(), path_or_url)
        resp = self._send_with_auth(method, url, step, headers or {}, body)
        redirects = 0
        while follow_redirects and resp.status in _REDIRECT_STATUSES and resp.header("Location"):
            redirects += 1
            if redirects > _MAX_REDIRECTS:
                resp.close()
                raise self._error(step, resp.status, f"more than {_MAX_REDIRECTS} redirects")
            target = urllib.parse.urljoin(resp.url, resp.header("Location"))
            resp.close()
            if resp.status == 303:
                method, body = "GET", None
            # Storage backends (S3, CDNs) get no registry credentials: they sign their own URLs.
            same_host = urllib.parse.urlsplit(target).netloc == self.endpoint.netloc
            resp = self._send(method, target, step, headers or {}, body, authorize=same_host)
        if resp.status not in expected:
            detail = _error_detail(resp)
            resp.close()
            if resp.status in (401, 403) and self._authorization:
                detail = f"registry refused our credentials or token: {detail}"
            raise self._error(step, resp.status, detail)
        return resp

    def _send_with_auth(self, method: str, url: str, step: str, headers: dict, body: Body) -> _Response:
        sent_authorization = self._authorization
        resp = self._send(method, url, step, headers, body, authorize=True)
        if resp.status != 401:
            return resp
        challenge_header = resp.header("WWW-Authenticate")
        detail = _error_detail(resp)
        resp.close()
        with self._auth_lock:
            # Another thread may have authenticated while we waited; only renew a stale header.
            if self._authorization == sent_authorization:
                self._authenticate(challenge_header, step, detail)
        return self._send(method, url, step, headers, body, authorize=True)

    def _send(self, method: str, url: str, step: str, headers: dict, body: Body,
              authorize: bool) -> _Response:
        parts = urllib.parse.urlsplit(url)
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if authorize and self._authorization:
            all_headers["Authorization"] = self._authorization
        conn = self._connect(parts.scheme, parts.netloc)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        stream = body() if callable(body) else None
        try:
            conn.request(method, target, body=stream if stream is not None else body,
                         headers=all_headers)
            return _Response(conn, conn.getresponse(), url)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._error(step, None, f"{method} {url}: {exc}") from exc
        finally:
            if stream is not None:
                stream.close()

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        host, port = split_host_port(netloc)
        if scheme == "https":
            context = ssl.create_default_context()
            if not self.endpoint.verify_tls and netloc == self.endpoint.netloc:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(host, port, timeout=self.client.timeout,
                                               context=context, blocksize=_HTTP_BLOCKSIZE)
        if scheme != "http":
            raise self._error("connect", None, f"unsupported URL scheme {scheme!r}")
        return http.client.HTTPConnection(host, port, timeout=self.client.timeout,
                                          blocksize=_HTTP_BLOCKSIZE)

    def _choose_insecure_scheme(self) -> None:
        """Docker's rule for insecure registries: HTTPS without verification, else plain HTTP."""
        try:
            with self._send("GET", f"https://{self.endpoint.netloc}/v2/", "probe HTTPS", {}, None,
                            authorize=False):
                return
        except RegistryError:
            self.endpoint.scheme = "http"

    # ------------------------------------------------------------ authentication

    def _authenticate(self, challenge_header: str, step: str, detail: str) -> None:
        challenges = {c.scheme: c for c in parse_www_authenticate(challenge_header)}
        pair = self.credentials.basic_pair(self.registry) if self.credentials else None
        if "bearer" in challenges:
            token = self._fetch_token(challenges["bearer"], pair)
            self._authorization = f"Bearer {token}"
        elif "basic" in challenges:
            if pair is None:
                raise self._error(step, 401, "registry requires a username and password; none given")
            if self._authorization.startswith("Basic "):
                raise self._error(step, 401, f"registry rejected the credentials: {detail}")
            self._authorization = "Basic " + _basic_token(*pair)
        else:
            raise self._error(step, 401, f"unsupported authentication challenge "
                                         f"{challenge_header!r}: {detail}")

    def _fetch_token(self, challenge: Challenge, pair: tuple[str, str] | None) -> str:
        step = "get bearer token"
        realm = challenge.params.get("realm")
        if not realm:
            raise self._error(step, 401, "Bearer challenge without a realm")
        scopes = [f"repository:{self.repository}:{self.actions}"]
        if challenge.params.get("scope") and challenge.params["scope"] not in scopes:
            scopes.append(challenge.params["scope"])
        service = challenge.params.get("service", "")
        if self.credentials and self.credentials.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": self.credentials.identity_token,
                    "service": service, "scope": " ".join(scopes), "client_id": "pyshim"}
            raw = urllib.parse.urlencode(form).encode()
            resp = self._send("POST", realm, step, {"Content-Type": "application/x-www-form-urlencoded",
                                                   "Content-Length": str(len(raw))}, raw,
                              authorize=False)
        else:
            query = urllib.parse.urlencode([("service", service)] + [("scope", s) for s in scopes])
            url = realm + ("&" if "?" in realm else "?") + query
            headers = {"Authorization": "Basic " + _basic_token(*pair)} if pair else {}
            resp = self._send("GET", url, step, headers, None, authorize=False)
        with resp:
            if resp.status != 200:
                raise self._error(step, resp.status, f"token service {realm}: {_error_detail(resp)}")
            try:
                doc = json.loads(resp.read(_MAX_ERROR_BODY))
            except ValueError as exc:
                raise self._error(step, resp.status, f"token service {realm} sent non-JSON: {exc}") from exc
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise self._error(step, 200, f"token service {realm} returned no token")
        return token


def _file_opener(path) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def _basic_token(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _error_detail(resp: _Response) -> str:
    """The registry's error message: its JSON `errors` list when present, else the raw text."""
    try:
        raw = resp.read(_MAX_ERROR_BODY)
    except (OSError, http.client.HTTPException):
        return ""
    try:
        errors = json.loads(raw).get("errors") or []
        messages = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
        if messages:
            return "; ".join(messages)
    except (ValueError, AttributeError):
        pass
    return raw.decode("utf-8", "replace").strip()[:500]

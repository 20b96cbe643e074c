"""Pull and push against a real docker-registry, and OCI layout import.

Needs /usr/bin/docker-registry and /bin/busybox (busybox-static); no pyshim daemon.
"""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import oci.registry
from integration.registry_server import REGISTRY_BINARY, RegistryServer
from integration.testimage import BUSYBOX, build_busybox_layout, push_busybox
from oci.digest import digest_of
from oci.errors import DigestMismatch, ImageNotFound, RegistryError
from oci.layout import archive_layout, import_oci_archive, write_oci_layout
from oci.registry import Credentials, RegistryClient
from oci.store import ImageStore

pytestmark = pytest.mark.skipif(
    not (os.access(REGISTRY_BINARY, os.X_OK) and BUSYBOX.is_file()),
    reason="needs docker-registry and busybox-static")


@pytest.fixture(scope="module")
def registry_server():
    with RegistryServer() as server:
        yield server


@pytest.fixture(scope="module")
def pushed(registry_server):
    """The busybox image built locally, in its own store, and pushed as busybox:latest."""
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-pushed-") as tmp:
        work = Path(tmp)
        ref = f"{registry_server.address}/busybox:latest"
        source = ImageStore(work / "store")
        [image] = import_oci_archive(source, build_busybox_layout(work / "layout", ref))
        digest = RegistryClient().push(source, image, ref)
        yield ref, digest, source, image


@pytest.fixture
def tmp_path():
    """Replaces pytest's tmp_path, which keeps the last runs' directories: tests leave nothing."""
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-test-") as d:
        yield Path(d)


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "store")


def test_pull_gets_what_was_pushed(pushed, store):
    ref, pushed_digest, source, local = pushed
    image = RegistryClient().pull(store, ref)

    assert image.id == local.id
    assert image.manifest_digest == pushed_digest == local.manifest_digest
    assert image.repo_tags == [ref]
    assert image.repo_digests == [f"{ref.rsplit(':', 1)[0]}@{pushed_digest}"]
    assert [layer.digest for layer in image.layers] == [layer.digest for layer in local.layers]
    assert image.config.cmd == ["sh"] and any(e.startswith("PATH=") for e in image.config.env)
    for layer in image.layers:
        assert digest_of(store.blob_path(layer.digest).read_bytes()) == layer.digest
    assert store.get("sha256:" + image.id[7:19]) == image


def test_pulled_layers_unpack_into_a_runnable_tree(pushed, store):
    image = RegistryClient().pull(store, pushed[0])
    busybox_dir, base_dir = store.layer_paths(image)
    assert os.readlink(busybox_dir / "bin/sh") == "/bin/busybox"
    assert os.readlink(busybox_dir / "bin/sleep") == "/bin/busybox"
    assert (busybox_dir / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.stat(busybox_dir / "bin/busybox").st_mode & 0o111
    assert (base_dir / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert "nobody" in (base_dir / "etc/group").read_text()
    assert stat.S_IMODE(os.lstat(base_dir / "tmp").st_mode) == 0o1777


def test_pull_by_digest_and_repull_skips_stored_blobs(pushed, store):
    ref, digest, _, _ = pushed
    by_tag = RegistryClient().pull(store, ref)
    inodes = {d: store.blob_path(d).stat().st_ino for d in by_tag.blob_digests()}

    name = ref.rsplit(":", 1)[0]
    by_digest = RegistryClient().pull(store, f"{name}@{digest}")
    assert by_digest.id == by_tag.id
    assert by_digest.repo_tags == [ref]
    assert {d: store.blob_path(d).stat().st_ino for d in by_tag.blob_digests()} == inodes
    assert store.get(f"{name}@{digest}") == by_digest


def test_missing_tag_and_repository_raise_image_not_found(registry_server, pushed, store):
    missing_tag = f"{registry_server.address}/busybox:no-such-tag"
    with pytest.raises(ImageNotFound) as info:
        RegistryClient().pull(store, missing_tag)
    assert missing_tag in str(info.value)
    assert registry_server.address in str(info.value)

    missing_repo = f"{registry_server.address}/nobody/here:1"
    with pytest.raises(ImageNotFound, match="nobody/here"):
        RegistryClient().pull(store, missing_repo)
    assert store.list() == []
    assert [p for p in (store.root / "blobs").rglob("*") if p.is_file()] == []


def test_unreachable_registry_error_names_registry_and_step(store):
    with RegistryServer() as server:
        address = server.address
    with pytest.raises(RegistryError) as info:
        RegistryClient(timeout=5).pull(store, f"{address}/busybox:latest")
    err = info.value
    assert err.registry == address and err.repository == "busybox"
    assert "manifest" in err.step and address in str(err)


def test_pull_resolves_an_index_to_linux_amd64(registry_server, pushed, store, tmp_path):
    _, _, source, amd64 = pushed
    layout = tmp_path / "arm"
    fake_layer = tmp_path / "arm.tar"
    fake_layer.write_bytes(b"\0" * 1024)  # an empty tar: two zero blocks
    write_oci_layout(layout, [fake_layer], {"architecture": "arm64", "os": "linux"}, "arm:1")
    [arm64] = import_oci_archive(source, layout)

    repo = f"{registry_server.address}/multi"
    client = RegistryClient()
    for image in (arm64, amd64):
        client.push(source, image, f"{repo}@{image.manifest_digest}")
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "annotations": {"org.example.index": "yes", "org.example.both": "index"},
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": img.manifest_digest, "size": len(source.manifest_bytes(img)),
             "platform": {"os": "linux", "architecture": arch},
             "annotations": {"org.example.arch": arch}}
            for img, arch in ((arm64, "arm64"), (amd64, "amd64"))]}).encode()
    _put_manifest(registry_server.address, "multi", "latest", index,
                  "application/vnd.oci.image.index.v1+json")

    image = client.pull(store, f"{repo}:latest")
    assert image.id == amd64.id
    assert image.manifest_digest == amd64.manifest_digest
    assert image.repo_digests == [f"{repo}@{digest_of(index)}"]
    assert image.annotations["org.example.index"] == "yes"
    assert image.annotations["org.example.arch"] == "amd64"
    assert not store.has_blob(arm64.config_digest)


def _put_manifest(address: str, repo: str, ref: str, body: bytes, media_type: str) -> None:
    conn = http.client.HTTPConnection(address, timeout=10)
    try:
        conn.request("PUT", f"/v2/{repo}/manifests/{ref}", body=body,
                     headers={"Content-Type": media_type})
        resp = conn.getresponse()
        assert resp.status == 201, resp.read()
    finally:
        conn.close()


def test_second_push_uploads_nothing_new(registry_server, pushed, monkeypatch):
    ref, digest, source, image = pushed
    uploads = []
    real_upload = oci.registry._Session.upload_blob

    def counting_upload(self, descriptor, open_source):
        uploads.append(descriptor.digest)
        return real_upload(self, descriptor, open_source)

    monkeypatch.setattr(oci.registry._Session, "upload_blob", counting_upload)
    assert RegistryClient().push(source, image, f"{registry_server.address}/busybox:again") == digest
    assert uploads == []
    RegistryClient().push(source, image, f"{registry_server.address}/elsewhere/busybox:1")
    assert sorted(uploads) == sorted(d for d in image.blob_digests() if d != image.manifest_digest)


def test_push_busybox_helper_returns_a_pullable_reference(registry_server, store):
    ref = push_busybox(registry_server.address, repo="helper/busybox", tag="v1")
    assert ref == f"{registry_server.address}/helper/busybox:v1"
    assert RegistryClient().pull(store, ref).repo_tags == [ref]


@pytest.mark.parametrize("compress", [False, True])
def test_layout_archive_import(pushed, store, tmp_path, compress):
    _, _, _, pushed_image = pushed
    layout = build_busybox_layout(tmp_path / "layout", "example.com/tools/busybox:1.0")
    archive = archive_layout(layout, tmp_path / ("bb.tar.gz" if compress else "bb.tar"), compress)

    [image] = import_oci_archive(store, archive)
    assert image.repo_tags == ["example.com/tools/busybox:1.0"]
    assert image.repo_digests == []
    assert image.config == pushed_image.config
    assert image.annotations["org.opencontainers.image.ref.name"] == "example.com/tools/busybox:1.0"
    assert os.readlink(store.layer_paths(image)[0] / "bin/sh") == "/bin/busybox"


def test_layout_directory_import_with_explicit_tag_and_no_orphans(store, tmp_path):
    layout = build_busybox_layout(tmp_path / "layout", "latest")  # bare ref.name: no repository
    stray = b"a blob nobody references"
    (layout / "blobs/sha256" / digest_of(stray)[7:]).write_bytes(stray)

    [untagged] = import_oci_archive(store, layout)
    assert untagged.repo_tags == []
    [tagged] = import_oci_archive(store, layout, tag="mine/busybox:dev")
    assert tagged.id == untagged.id and tagged.repo_tags == ["docker.io/mine/busybox:dev"]
    assert not store.has_blob(digest_of(stray))
    stored = {p.name for p in (store.root / "blobs/sha256").iterdir()}
    assert stored == {d[7:] for d in tagged.blob_digests()}


def test_layout_import_rejects_tampered_blobs(store, tmp_path):
    layout = build_busybox_layout(tmp_path / "layout")
    manifest_desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / manifest_desc["digest"][7:]).read_text())
    victim = layout / "blobs/sha256" / manifest["layers"][1]["digest"][7:]
    victim.write_bytes(victim.read_bytes()[:-1] + b"X")
    with pytest.raises(DigestMismatch):
        import_oci_archive(store, layout)
    assert store.list() == []
    assert [p for p in (store.root / "blobs").rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- authentication

def _bcrypt_htpasswd_line(user: str, password: str) -> str:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            pytest.skip("the crypt module (bcrypt for htpasswd) is not available")
    # Cost 4 (16 rounds): the registry checks the hash on every request; tests need speed, not strength.
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        pytest.skip("libcrypt cannot make bcrypt hashes")
    return f"{user}:{hashed}\n"


@pytest.fixture(scope="module")
def basic_auth_registry():
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-htpasswd-") as tmp:
        htpasswd = Path(tmp) / "htpasswd"
        htpasswd.write_text(_bcrypt_htpasswd_line("alice", "s3cret"))
        with RegistryServer(auth_yaml=f"  htpasswd:\n    realm: pyshim-test\n    path: {htpasswd}\n") as server:
            yield server


def test_basic_auth(basic_auth_registry, store):
    address = basic_auth_registry.address
    with pytest.raises(RegistryError) as info:
        push_busybox(address, repo="private/busybox")
    assert info.value.status == 401 and info.value.step.startswith("check blob")

    ref = push_busybox(address, repo="private/busybox", auth=Credentials("alice", "s3cret"))
    with pytest.raises(RegistryError, match="username and password") as info:
        RegistryClient().pull(store, ref)
    assert info.value.status == 401 and info.value.registry == address
    with pytest.raises(RegistryError, match="refused our credentials"):
        RegistryClient().pull(store, ref, Credentials("alice", "wrong"))
    assert store.list() == []

    encoded = base64.b64encode(b"alice:s3cret").decode()
    assert RegistryClient().pull(store, ref, Credentials(auth=encoded)).repo_tags == [ref]


class TokenService:
    """A minimal Docker token service (the auth server, not the registry) for token-auth tests.

    Issues RS256 JWTs, signed with openssl, that the real docker-registry verifies against our
    self-signed certificate. Users authenticate with Basic auth (GET) or an OAuth2 refresh
    token (POST); everyone gets the actions they ask for.
    """

    SERVICE = "pyshim-test-registry"
    ISSUER = "pyshim-test-issuer"

    def __init__(self, workdir: Path, users: dict[str, str], refresh_tokens: dict[str, str]):
        self.workdir = workdir
        self.users = users
        self.refresh_tokens = refresh_tokens
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=pyshim-test-token", "-keyout", str(self.key),
                        "-out", str(self.cert)], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth_yaml(self) -> str:
        return (f"  token:\n    realm: {self.realm}\n    service: {self.SERVICE}\n"
                f"    issuer: {self.ISSUER}\n    rootcertbundle: {self.cert}\n")

    def __enter__(self) -> "TokenService":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def mint(self, subject: str, scopes: list[str]) -> str:
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.ISSUER, "sub": subject, "aud": self.SERVICE, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _handler_class(self):
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                service.requests.append(f"GET {self.path}")
                user = self._basic_user()
                if user is None:
                    return self._reply(401, {"details": "bad or missing credentials"})
                self._reply(200, {"token": service.mint(user, query.get("scope", []))})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                service.requests.append(f"POST {form.get('grant_type')}")
                user = service.refresh_tokens.get((form.get("refresh_token") or [""])[0])
                if form.get("grant_type") != ["refresh_token"] or user is None:
                    return self._reply(401, {"error": "invalid_grant"})
                scopes = " ".join(form.get("scope", [])).split()
                self._reply(200, {"access_token": service.mint(user, scopes)})

            def _basic_user(self):
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                return user if service.users.get(user) == password else None

            def _reply(self, status, doc):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def token_auth():
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to sign test tokens")
    with tempfile.TemporaryDirectory(prefix="pyshim-oci-token-") as tmp, \
            TokenService(Path(tmp), {"bob": "hunter2"}, {"refresh-for-bob": "bob"}) as tokens, \
            RegistryServer(auth_yaml=tokens.registry_auth_yaml()) as server:
        yield server, tokens


def test_bearer_token_auth(token_auth, store):
    server, tokens = token_auth
    address = server.address
    ref = push_busybox(address, repo="team/busybox", auth=Credentials("bob", "hunter2"))
    assert any("scope=repository%3Ateam%2Fbusybox%3Apull%2Cpush" in r for r in tokens.requests)

    with pytest.raises(RegistryError) as info:
        RegistryClient().pull(store, ref)
    assert info.value.step == "get bearer token" and info.value.status == 401
    assert tokens.realm in str(info.value)
    with pytest.raises(RegistryError, match="get bearer token"):
        RegistryClient().pull(store, ref, Credentials("bob", "wrong"))

    assert RegistryClient().pull(store, ref, Credentials("bob", "hunter2")).repo_tags == [ref]
    store.remove(ref)
    tokens.requests.clear()
    assert RegistryClient().pull(store, ref, Credentials(identity_token="refresh-for-bob")).repo_tags == [ref]
    assert tokens.requests == ["POST ['refresh_token']"]
    store.remove(ref)
    tokens.requests.clear()
    ready = tokens.mint("bob", ["repository:team/busybox:pull"])
    assert RegistryClient().pull(store, ref, Credentials(registry_token=ready)).repo_tags == [ref]
    assert tokens.requests == []  # a registry token is presented as-is, no token service trip
    store.remove(ref)
    # The registry really checks signatures: the same claims with a bad signature are refused.
    forged = ready.rsplit(".", 1)[0] + "." + _b64url(b"\0" * 256)
    with pytest.raises(RegistryError, match="refused our credentials|get bearer token"):
        RegistryClient().pull(store, ref, Credentials(registry_token=forged))


# ---------------------------------------------------------------- mirrors

def _unused_loopback_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_pull_goes_through_the_first_mirror_that_has_the_image(pushed, store):
    ref, pushed_digest, source, local = pushed
    mirror = ref.split("/", 1)[0]
    down = f"127.0.0.1:{_unused_loopback_port()}"
    client = RegistryClient(mirrors={"registry.invalid": (down, mirror)})

    image = client.pull(store, "registry.invalid/busybox:latest")

    assert image.id == local.id
    # Recorded under the name that was asked for, not the mirror's.
    assert image.repo_tags == ["registry.invalid/busybox:latest"]
    assert image.repo_digests == [f"registry.invalid/busybox@{pushed_digest}"]


def test_a_pull_by_digest_through_a_mirror_is_checked_against_the_digest(pushed, store):
    ref, pushed_digest, source, local = pushed
    client = RegistryClient(mirrors={"registry.invalid": (ref.split("/", 1)[0],)})

    image = client.pull(store, f"registry.invalid/busybox@{pushed_digest}")

    assert image.id == local.id
    wrong = "sha256:" + "0" * 64
    # The mirror has no such manifest and registry.invalid does not resolve: nothing is pulled.
    with pytest.raises((ImageNotFound, RegistryError)) as caught:
        client.pull(store, f"registry.invalid/busybox@{wrong}")
    assert "has no manifest" in str(caught.value)


def test_when_every_mirror_fails_the_error_names_them(pushed, store):
    ref, *_ = pushed
    mirror = ref.split("/", 1)[0]
    down = f"127.0.0.1:{_unused_loopback_port()}"
    # The "registry" itself is a closed loopback port too, so the pull fails everywhere.
    upstream = f"127.0.0.1:{_unused_loopback_port()}"
    client = RegistryClient(mirrors={upstream: (down, mirror)})

    with pytest.raises(RegistryError) as caught:
        client.pull(store, f"{upstream}/no-such-image:latest")

    message = str(caught.value)
    assert f"mirror {down}" in message and f"mirror {mirror}" in message
    assert store.list() == []


def test_mirrors_never_get_the_callers_credentials(pushed, store, monkeypatch):
    ref, *_ = pushed
    mirror = ref.split("/", 1)[0]
    seen: list[Credentials | None] = []
    real_init = oci.registry._Session.__post_init__

    def record(session):
        seen.append((session.host, session.credentials))
        real_init(session)

    monkeypatch.setattr(oci.registry._Session, "__post_init__", record)
    RegistryClient(mirrors={"registry.invalid": (mirror,)}).pull(
        store, "registry.invalid/busybox:latest", auth=Credentials(username="u", password="p"))

    assert seen == [(mirror, None)]

import pytest

from oci.errors import InvalidReference
from oci.reference import Reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("text, expected", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ("someone/app:v2", "docker.io/someone/app:v2"),
    ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t"),
    ("quay.io/org/app_x.y-z:1.0", "quay.io/org/app_x.y-z:1.0"),
    ("[::1]:5000/app", "[::1]:5000/app:latest"),
    (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
    (f"busybox:1.36@{DIGEST}", f"docker.io/library/busybox:1.36@{DIGEST}"),
    (f"127.0.0.1:5000/busybox@{DIGEST}", f"127.0.0.1:5000/busybox@{DIGEST}"),
])
def test_parse_normalises_like_docker(text, expected):
    assert str(Reference.parse(text)) == expected


def test_fields_of_a_full_reference():
    ref = Reference.parse(f"127.0.0.1:5000/team/app:v1@{DIGEST}")
    assert ref == Reference("127.0.0.1:5000", "team/app", "v1", DIGEST)
    assert ref.name == "127.0.0.1:5000/team/app"
    assert ref.host == "127.0.0.1"


def test_digest_only_reference_has_no_default_tag():
    ref = Reference.parse(f"busybox@{DIGEST}")
    assert ref.tag is None and ref.digest == DIGEST


@pytest.mark.parametrize("text", [
    "", " busybox", "Busybox", "busybox:", "busybox:-bad", "busybox@sha256:abc",
    "busybox@md5:" + "a" * 32, "a//b", "/busybox", "busybox/", "a" * 64,
    "bad_host:5000:1/app", "app..x", "UPPER.io/app/", "x:" + "t" * 129,
])
def test_invalid_references_are_refused(text):
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text, loopback", [
    ("127.0.0.1:5000/a", True),
    ("127.1.2.3/a", True),
    ("localhost:5000/a", True),
    ("[::1]:5000/a", True),
    ("10.0.0.1:5000/a", False),
    ("registry.example.com/a", False),
    ("busybox", False),
])
def test_is_loopback(text, loopback):
    assert Reference.parse(text).is_loopback() is loopback


def test_reference_is_frozen_and_hashable():
    ref = Reference.parse("busybox")
    with pytest.raises(AttributeError):
        ref.tag = "other"  # type: ignore[misc]
    assert {ref, Reference.parse("docker.io/library/busybox:latest")} == {ref}

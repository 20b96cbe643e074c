"""Unit tests of the registry client's pure parts; talking to a registry is in integration/."""
import base64

import pytest

from oci.errors import ImageError
from oci.registry import Credentials, RegistryClient, parse_www_authenticate


def test_parse_bearer_challenge():
    [challenge] = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.docker.io/token",
                                "service": "registry.docker.io",
                                "scope": "repository:library/busybox:pull,push"}


def test_parse_several_challenges_and_escapes():
    challenges = parse_www_authenticate(
        'Basic realm="a \\"quoted\\" realm", Bearer realm=https://x/token, service=svc')
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": 'a "quoted" realm'}
    assert challenges[1].params == {"realm": "https://x/token", "service": "svc"}


def test_parse_empty_challenge():
    assert parse_www_authenticate("") == []


def test_credentials_pairs():
    assert Credentials("u", "p").basic_pair("r") == ("u", "p")
    encoded = base64.b64encode(b"user:pa:ss").decode()
    assert Credentials(auth=encoded).basic_pair("r") == ("user", "pa:ss")
    assert Credentials(identity_token="t").basic_pair("r") is None
    with pytest.raises(ImageError, match="registry.example"):
        Credentials(auth="!!!").basic_pair("registry.example")
    with pytest.raises(ImageError, match="no user:password"):
        Credentials(auth=base64.b64encode(b"nocolon").decode()).basic_pair("r")


@pytest.mark.parametrize("registry, insecure, scheme, netloc, verify", [
    ("docker.io", (), "https", "registry-1.docker.io", True),
    ("quay.io", (), "https", "quay.io", True),
    ("127.0.0.1:5000", (), "http", "127.0.0.1:5000", True),
    ("localhost:5000", (), "http", "localhost:5000", True),
    ("[::1]:5000", (), "http", "[::1]:5000", True),
    ("10.1.2.3:5000", ("10.1.2.3:5000",), "https", "10.1.2.3:5000", False),
    ("myreg.lan", ("myreg.lan",), "https", "myreg.lan", False),
    ("myreg.lan:443", ("myreg.lan:5000",), "https", "myreg.lan:443", True),
])
def test_endpoint_choice_follows_docker(registry, insecure, scheme, netloc, verify):
    endpoint = RegistryClient(insecure_registries=insecure).endpoint_for(registry)
    assert (endpoint.scheme, endpoint.netloc, endpoint.verify_tls) == (scheme, netloc, verify)
    assert endpoint.may_fall_back_to_http == (not verify)

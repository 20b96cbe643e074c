"""Fixtures for end-to-end tests: a real docker-registry with a busybox image, a real pyshim daemon.

Each test must leave nothing behind: after every test the daemon must list no pods or containers,
and the machine must hold no mount, runc container, network namespace or conmon of that daemon.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from integration.daemon import (Daemon, DaemonSettings, keep_daemon_log, leftovers, remove_cgroup_tree,
                                remove_everything)

pytestmark = pytest.mark.integration


def _require_root_and_tools():
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    missing = [t for t in ("runc", "conmon", "docker-registry") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing system tools {missing}: run `make deps` (scripts/install-system-deps.sh)")


@pytest.fixture(scope="session")
def registry():
    _require_root_and_tools()
    from integration.registry_server import RegistryServer

    with RegistryServer() as server:
        yield server


@pytest.fixture(scope="session")
def busybox_ref(registry) -> str:
    from integration.testimage import push_busybox

    return push_busybox(registry.address)


def new_settings(tag: str, subnet: str) -> DaemonSettings:
    # Short paths: unix socket paths are limited to 108 bytes.
    base = Path(tempfile.mkdtemp(prefix=f"pyshim-{tag}-", dir="/tmp"))
    suffix = uuid.uuid4().hex[:4]
    return DaemonSettings(base=base, bridge=f"pyst{suffix}", subnet=subnet, netns_prefix=f"pyst{suffix}-")


# Pod log directories of all tests, removed at the end of the session.
# One per test session: concurrent sessions on one machine must not delete each other's pod logs.
LOG_ROOT = Path(tempfile.gettempdir()) / f"pyshim-test-logs-{os.getpid()}"


def discard(settings: DaemonSettings) -> list[str]:
    keep_daemon_log(settings)
    subprocess.run(["ip", "link", "del", settings.bridge], capture_output=True)
    shutil.rmtree(settings.base, ignore_errors=True)
    # The daemon's cgroup parent, in every hierarchy (its pods removed theirs); what remains is a leak.
    return remove_cgroup_tree(settings.cgroup_parent)


@pytest.fixture(scope="session", autouse=True)
def _pod_log_root():
    LOG_ROOT.mkdir(exist_ok=True)
    yield
    shutil.rmtree(LOG_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(registry):
    settings = new_settings("it", "10.86.0.0/24")
    d = Daemon(settings)
    try:
        d.start()
    except BaseException:
        # A daemon that never served (e.g. an import error) leaves its directory otherwise.
        d.stop()
        discard(settings)
        raise
    yield d
    d.stop()
    found = leftovers(settings)
    discard(settings)
    assert not found, f"the daemon left these behind: {found}"


@pytest.fixture(scope="session")
def pulled_busybox(daemon, busybox_ref) -> str:
    with daemon.client() as c:
        c.pull(busybox_ref)
    return busybox_ref


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c
    # Leave-nothing-behind check: the test removed what it made, and that removed everything.
    with daemon.client() as c:
        pods, containers = remove_everything(c)
    assert not pods and not containers, \
        f"test left {len(pods)} pod(s) and {len(containers)} container(s) in the daemon"
    assert not leftovers(daemon.settings), f"leaked: {leftovers(daemon.settings)}"


def pod_config(name: str = None, **kwargs) -> "cri.PodSandboxConfig":
    name = f"pod-{uuid.uuid4().hex[:6]}" if name is None else name
    log_dir = kwargs.pop("log_directory", None) or str(LOG_ROOT / name / uuid.uuid4().hex[:8])
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=uuid.uuid4().hex, attempt=0),
        hostname=kwargs.pop("hostname", name), log_directory=log_dir, **kwargs)


def container_config(image: str, command: list[str], name: str = "main", **kwargs) -> "cri.ContainerConfig":
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name, attempt=0), image=cri.ImageSpec(image=image),
                               command=command, log_path=kwargs.pop("log_path", f"{name}/0.log"), **kwargs)


@pytest.fixture(scope="session")
def two_nodes():
    """Two nodes on this machine (integration/nodes.py): `.a`, `.b` (each `.daemon`, `.netns`, `.wire_ip`,
    `.pod_subnet`, `.client()`, `.run()`, `.tcp_exchange()`), `.registry` on the wire, `.busybox_ref`.

    Session-wide; a test that uses it directly must remove its pods itself (or use `two_nodes_clean`).
    At the end everything is removed, and whatever was left fails the session."""
    _require_root_and_tools()
    from integration.nodes import two_nodes_up

    with two_nodes_up() as nodes:
        yield nodes


@pytest.fixture
def two_nodes_clean(two_nodes):
    """`two_nodes`, with the leave-nothing-behind check of `client` on both nodes after the test."""
    yield two_nodes
    found = two_nodes.remove_everything()
    left = {name: (len(p), len(c)) for name, (p, c) in found.items() if p or c}
    assert not left, f"test left (pods, containers) per node: {left}"
    assert not two_nodes.leftovers(), f"leaked: {two_nodes.leftovers()}"

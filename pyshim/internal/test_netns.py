import os
import subprocess
import uuid

import pytest
from pyroute2 import IPRoute

from pyshim.errors import AlreadyExists, InvalidArgument
from pyshim.internal import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def ns_name():
    name = f"pyshim-t-{uuid.uuid4().hex[:12]}"
    yield name
    netns.remove_netns(name)
    assert not netns.netns_path(name).exists()


def test_create_pins_a_new_namespace_visible_to_ip_netns(ns_name):
    path = netns.create_netns(ns_name)

    assert path == netns.NETNS_DIR / ns_name
    assert netns.is_ns_pin(path)
    assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert ns_name in listed.stdout.split()


def test_loopback_is_up_inside(ns_name):
    path = netns.create_netns(ns_name)

    with IPRoute(netns=str(path)) as ipr:
        (lo,) = ipr.get_links(ifname="lo")
    assert lo["flags"] & 1, "IFF_UP not set on lo"


def test_create_twice_is_refused(ns_name):
    netns.create_netns(ns_name)
    with pytest.raises(AlreadyExists, match=ns_name):
        netns.create_netns(ns_name)


def test_create_reuses_an_empty_leftover_pin_file(ns_name):
    leftover = netns.netns_path(ns_name)
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.touch()

    netns.create_netns(ns_name)

    assert netns.is_ns_pin(leftover)


def test_remove_is_idempotent(ns_name):
    netns.create_netns(ns_name)

    netns.remove_netns(ns_name)
    netns.remove_netns(ns_name)

    assert not netns.netns_exists(ns_name)
    assert not netns.netns_path(ns_name).exists()


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "-x", "x" * 300])
def test_bad_names_are_invalid_arguments(bad):
    with pytest.raises(InvalidArgument):
        netns.netns_path(bad)

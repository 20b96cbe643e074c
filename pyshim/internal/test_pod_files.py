import os
import stat

import pytest

from pyshim.errors import InvalidArgument
from pyshim.internal import pod_files


def test_resolv_conf_from_dns_config(tmp_path):
    path = tmp_path / "resolv.conf"

    pod_files.write_resolv_conf(path, ["10.96.0.10", "fd00::a"], ["ns.svc.cluster.local", "cluster.local"], ["ndots:5"])

    assert path.read_text() == (
        "nameserver 10.96.0.10\n"
        "nameserver fd00::a\n"
        "search ns.svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_empty_dns_config_copies_the_host_file(tmp_path):
    host = tmp_path / "host-resolv.conf"
    host.write_text("nameserver 192.0.2.53\nsearch example.org\n")
    path = tmp_path / "resolv.conf"

    pod_files.write_resolv_conf(path, [], [], [], host_resolv_conf=host)

    assert path.read_text() == host.read_text()
    assert path.stat().st_ino != host.stat().st_ino, "must be a copy, not the host file"


def test_empty_dns_config_without_host_file_gives_empty_file(tmp_path):
    path = tmp_path / "resolv.conf"
    pod_files.write_resolv_conf(path, [], [], [], host_resolv_conf=tmp_path / "absent")
    assert path.read_text() == ""


@pytest.mark.parametrize(
    "servers, searches, options",
    [(["not-an-ip"], [], []), (["10.0.0.1"], ["a b"], []), (["10.0.0.1"], [], ["ndots:5\nnameserver 1.2.3.4"])],
)
def test_bad_dns_config_is_refused_and_nothing_written(tmp_path, servers, searches, options):
    path = tmp_path / "resolv.conf"
    with pytest.raises(InvalidArgument):
        pod_files.write_resolv_conf(path, servers, searches, options)
    assert not path.exists()


def test_hosts_has_localhost_and_pod_name(tmp_path):
    path = tmp_path / "hosts"

    pod_files.write_hosts(path, "web-0", "10.88.0.5")

    lines = path.read_text().splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert lines[1].startswith("::1\tlocalhost")
    assert lines[-1] == "10.88.0.5\tweb-0"


def test_hosts_without_ip_maps_name_to_127_0_1_1(tmp_path):
    path = tmp_path / "hosts"
    pod_files.write_hosts(path, "web-0", None)
    assert path.read_text().splitlines()[-1] == "127.0.1.1\tweb-0"


def test_hostname_file(tmp_path):
    path = tmp_path / "hostname"
    pod_files.write_hostname(path, "web-0.example")
    assert path.read_text() == "web-0.example\n"


@pytest.mark.parametrize("bad", ["", "-x", "x_y", "a..b", "a b", "x" * 65, "bad\nname"])
def test_bad_hostnames_are_refused(tmp_path, bad):
    with pytest.raises(InvalidArgument, match="hostname"):
        pod_files.write_hostname(tmp_path / "hostname", bad)


def test_rewrite_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "hostname"
    pod_files.write_hostname(path, "one")
    pod_files.write_hostname(path, "two")

    assert path.read_text() == "two\n"
    assert os.listdir(tmp_path) == ["hostname"]

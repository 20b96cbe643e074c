import pytest

from pyshim.errors import InvalidArgument
from pyshim.internal.sysctls import normalize_sysctl_name, sysctl_namespace, validate_sysctls


@pytest.mark.parametrize(
    "name, namespace",
    [
        ("kernel.shm_rmid_forced", "ipc"),
        ("kernel.shmmax", "ipc"),
        ("kernel.msgmax", "ipc"),
        ("kernel.sem", "ipc"),
        ("fs.mqueue.msg_max", "ipc"),
        ("net.ipv4.ip_local_port_range", "net"),
        ("net.core.somaxconn", "net"),
        ("kernel.hostname", None),
        ("kernel.semx", None),
        ("vm.swappiness", None),
        ("fs.mqueuex", None),
        ("netx.foo", None),
    ],
)
def test_namespace_of_sysctl(name, namespace):
    assert sysctl_namespace(name) == namespace


def test_valid_sysctls_come_back_dotted():
    got = validate_sysctls(
        {"net/ipv4/ip_forward": "1", "kernel.shm_rmid_forced": "1", "net/ipv4/conf/eth0.100/rp_filter": "0"},
        host_network=False,
        host_ipc=False,
    )
    assert got == {
        "net.ipv4.ip_forward": "1",
        "kernel.shm_rmid_forced": "1",
        "net.ipv4.conf.eth0/100.rp_filter": "0",
    }


def test_dot_notation_keeps_slashes_inside_segments():
    assert normalize_sysctl_name("net.ipv4.conf.eth0/100.rp_filter") == "net.ipv4.conf.eth0/100.rp_filter"


@pytest.mark.parametrize("name", ["vm.swappiness", "kernel.hostname", "kernel/panic"])
def test_host_wide_sysctls_are_refused(name):
    with pytest.raises(InvalidArgument, match="not namespaced"):
        validate_sysctls({name: "1"}, host_network=False, host_ipc=False)


def test_net_sysctl_refused_with_host_network_but_ipc_allowed():
    with pytest.raises(InvalidArgument, match="host network"):
        validate_sysctls({"net.core.somaxconn": "1024"}, host_network=True, host_ipc=False)
    assert validate_sysctls({"kernel.sem": "250 32000 32 128"}, host_network=True, host_ipc=False)


def test_ipc_sysctl_refused_with_host_ipc_but_net_allowed():
    with pytest.raises(InvalidArgument, match="host IPC"):
        validate_sysctls({"fs.mqueue.msg_max": "20"}, host_network=False, host_ipc=True)
    assert validate_sysctls({"net.core.somaxconn": "1024"}, host_network=False, host_ipc=True)


@pytest.mark.parametrize(
    "name", ["", "Net.core.somaxconn", "net..core", "net.core.", ".net", "net core", "net.-x", "x" * 254]
)
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="invalid sysctl name"):
        validate_sysctls({name: "1"}, host_network=False, host_ipc=False)


@pytest.mark.parametrize("value", ["1\n", "1\nnet.ipv4.ip_forward=1", "1\x00", "1\r"])
def test_values_with_newlines_are_refused(value):
    with pytest.raises(InvalidArgument, match="newline"):
        validate_sysctls({"net.core.somaxconn": value}, host_network=False, host_ipc=False)


def test_empty_is_fine():
    assert validate_sysctls({}, host_network=True, host_ipc=True) == {}

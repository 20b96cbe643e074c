from pyshim.checkpoint_restore import tcp_lock
from pyshim.checkpoint_restore.tcp_lock import Connection


def test_proc_net_addresses_decode_including_ipv4_mapped():
    assert tcp_lock._address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert tcp_lock._address("00000000000000000000000001000000:0016") == ("::1", 22)
    # [::ffff:10.98.7.2]:7000 as a dual-stack listener's connection shows it in /proc/net/tcp6.
    assert tcp_lock._address("0000000000000000FFFF00000207620A:1B58") == ("10.98.7.2", 7000)


def test_lock_rules_drop_both_directions_of_each_connection_in_one_chain():
    rules = tcp_lock._rules("PYSHIM-LOCK-abc", [Connection("10.0.0.2", 7000, "10.0.0.1", 40000)])
    assert "-A PYSHIM-LOCK-abc -p tcp -s 10.0.0.1 --sport 40000 -d 10.0.0.2 --dport 7000 -j DROP" in rules
    assert "-A PYSHIM-LOCK-abc -p tcp -s 10.0.0.2 --sport 7000 -d 10.0.0.1 --dport 40000 -j DROP" in rules
    assert "-I INPUT -j PYSHIM-LOCK-abc" in rules and "-I OUTPUT -j PYSHIM-LOCK-abc" in rules
    assert rules.startswith("*filter") and rules.rstrip().endswith("COMMIT")


def test_chain_names_fit_iptables():
    assert len(tcp_lock.chain_name("f" * 64)) <= 28

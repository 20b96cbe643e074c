"""CNI chain semantics, checked with scripted fake plugins that log every call."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

from pyshim.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from pyshim.internal import cni
from pyshim.internal.cni import CNIConfigError, CNINetwork, CNIPluginError, NetworkAttachment, PortMapping

SANDBOX = "a" * 64

# A fake plugin: logs its environment and stdin, then obeys its config. "fail" names the
# command to fail; "result" is returned on ADD (else prevResult passes through).
FAKE_PLUGIN = textwrap.dedent(
    f"""\
    #!{sys.executable}
    import json, os, sys
    conf = json.load(sys.stdin)
    env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
    with open(conf["log"], "a") as f:
        f.write(json.dumps({{"type": conf["type"], "env": env, "conf": conf}}) + "\\n")
    cmd = env["CNI_COMMAND"]
    if conf.get("fail") == cmd:
        print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 7, "msg": conf["type"] + " says no", "details": "because"}}))
        sys.exit(1)
    if conf.get("garble") == cmd:
        print("plain text failure", file=sys.stderr)
        sys.exit(2)
    if cmd == "ADD":
        print(json.dumps(conf.get("result") or conf.get("prevResult") or {{"cniVersion": conf["cniVersion"]}}))
    """
)

BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "br0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"interface": 2, "address": "fd00::5/64"},
        {"interface": 2, "address": "10.99.0.5/24", "gateway": "10.99.0.1"},
    ],
}


@pytest.fixture
def env(tmp_path):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    for name in ("one", "two", "three", "fake-ipam"):
        path = plugin_dir / name
        path.write_text(FAKE_PLUGIN)
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    netns_file = tmp_path / "netns"  # any existing path stands in for a netns on ADD
    netns_file.touch()

    class Env:
        def conflist(self, **overrides):
            plugins = [
                {"type": "one", "log": str(log), "result": BRIDGE_RESULT, "ipam": {"type": "fake-ipam"}},
                {"type": "two", "log": str(log), "capabilities": {"portMappings": True}},
                {"type": "three", "log": str(log)},
            ]
            for index, extra in overrides.items():
                plugins[int(index[1:])].update(extra)
            return {"cniVersion": "1.0.0", "name": "testnet", "plugins": plugins}

        def network(self, conflist=None):
            return CNINetwork(conflist or self.conflist(), [tmp_path / "empty", plugin_dir], tmp_path / "cache")

        def calls(self):
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        def clear(self):
            log.unlink(missing_ok=True)

    e = Env()
    e.netns = netns_file
    e.cache = tmp_path / "cache"
    return e


def attach(network, netns, mappings=()):
    return network.attach(SANDBOX, netns, "web", "default", "uid-1", list(mappings))


def test_add_runs_chain_in_order_passing_prev_results(env):
    attachment = attach(env.network(), env.netns, [PortMapping(8080, 80)])

    calls = env.calls()
    assert [c["type"] for c in calls] == ["one", "two", "three"]
    assert "prevResult" not in calls[0]["conf"]
    assert calls[1]["conf"]["prevResult"] == BRIDGE_RESULT
    assert calls[2]["conf"]["prevResult"] == BRIDGE_RESULT
    for call in calls:
        assert call["conf"]["name"] == "testnet" and call["conf"]["cniVersion"] == "1.0.0"
        assert call["env"]["CNI_COMMAND"] == "ADD"
        assert call["env"]["CNI_CONTAINERID"] == SANDBOX
        assert call["env"]["CNI_NETNS"] == str(env.netns)
        assert call["env"]["CNI_IFNAME"] == "eth0"
        assert call["env"]["CNI_PATH"].endswith("/plugins")
        assert call["env"]["CNI_ARGS"] == (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={SANDBOX};K8S_POD_UID=uid-1"
        )
    assert attachment == NetworkAttachment("eth0", "10.99.0.5", 24, "10.99.0.1", "aa:aa:aa:aa:aa:03", BRIDGE_RESULT)


def test_port_mappings_only_go_to_plugins_with_the_capability(env):
    attach(env.network(), env.netns, [PortMapping(8080, 80, "TCP"), PortMapping(0, 53, "udp"), PortMapping(5353, 53, "udp", "127.0.0.1")])

    by_type = {c["type"]: c["conf"] for c in env.calls()}
    assert by_type["two"]["runtimeConfig"] == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
        ]
    }
    assert "runtimeConfig" not in by_type["one"] and "runtimeConfig" not in by_type["three"]


def test_failed_add_deletes_what_was_added_in_reverse_and_reports_plugin_message(env):
    network = env.network(env.conflist(p1={"fail": "ADD"}))

    with pytest.raises(CNIPluginError) as info:
        attach(network, env.netns)

    assert "two says no (because)" in info.value.message
    assert info.value.cni_code == 7 and info.value.plugin == "two"
    calls = [(c["type"], c["env"]["CNI_COMMAND"]) for c in env.calls()]
    assert calls == [("one", "ADD"), ("two", "ADD"), ("two", "DEL"), ("one", "DEL")]
    assert env.calls()[2]["conf"]["prevResult"] == BRIDGE_RESULT
    assert network.cached_sandbox_ids() == []


def test_failed_rollback_keeps_record_so_detach_can_retry(env):
    conflist = env.conflist(p1={"fail": "ADD"}, p0={"garble": "DEL"})
    network = env.network(conflist)

    with pytest.raises(CNIPluginError, match="undoing the ADD failed.*plain text failure"):
        attach(network, env.netns)
    assert network.cached_sandbox_ids() == [SANDBOX]

    # once the plugin is fixed, detach (from a fresh daemon) completes the cleanup
    conflist["plugins"][0].pop("garble")
    record = json.loads((env.cache / f"{SANDBOX}.json").read_text())
    record["conflist"] = conflist
    (env.cache / f"{SANDBOX}.json").write_text(json.dumps(record))
    env.clear()
    env.network(conflist).detach(SANDBOX, env.netns)
    assert network.cached_sandbox_ids() == []


def test_plain_text_plugin_error_is_reported(env):
    network = env.network(env.conflist(p0={"garble": "ADD"}))
    with pytest.raises(CNIPluginError, match="CNI plugin one ADD .* failed: plain text failure"):
        attach(network, env.netns)


def test_detach_after_restart_uses_recorded_config_in_reverse_with_final_result(env):
    attach(env.network(), env.netns, [PortMapping(8080, 80)])
    env.clear()

    # a new daemon, configured with a different network, detaches the old sandbox
    other = env.conflist()
    other["name"] = "othernet"
    restarted = env.network(other)
    assert restarted.cached_attachment(SANDBOX).ip == "10.99.0.5"
    restarted.detach(SANDBOX, env.netns, port_mappings=[])

    calls = env.calls()
    assert [c["type"] for c in calls] == ["three", "two", "one"]
    for call in calls:
        assert call["env"]["CNI_COMMAND"] == "DEL"
        assert call["conf"]["name"] == "testnet"
        assert call["conf"]["prevResult"] == BRIDGE_RESULT
        # env.netns is a plain file, not a mounted netns: treated as gone
        assert call["env"]["CNI_NETNS"] == ""
    assert calls[1]["conf"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 8080
    assert restarted.cached_sandbox_ids() == []
    assert restarted.cached_attachment(SANDBOX) is None


def test_detach_passes_a_live_netns(env):
    attach(env.network(), env.netns)
    env.clear()
    env.network().detach(SANDBOX, Path("/proc/self/ns/net"))
    assert {c["env"]["CNI_NETNS"] for c in env.calls()} == {"/proc/self/ns/net"}


def test_detach_without_record_is_idempotent_and_uses_arguments(env):
    network = env.network()
    network.detach(SANDBOX, None, [PortMapping(9090, 90)])
    network.detach(SANDBOX, None)

    first = env.calls()[:3]
    assert [c["type"] for c in first] == ["three", "two", "one"]
    assert all("prevResult" not in c["conf"] for c in first)
    assert first[1]["conf"]["runtimeConfig"]["portMappings"][0]["hostPort"] == 9090


def test_failed_detach_keeps_record_and_still_deletes_the_rest(env):
    conflist = env.conflist(p2={"fail": "DEL"})
    network = env.network(conflist)
    attach(network, env.netns)
    env.clear()

    with pytest.raises(CNIPluginError, match="three says no"):
        network.detach(SANDBOX, None)
    assert [c["type"] for c in env.calls()] == ["three", "two", "one"]
    assert network.cached_sandbox_ids() == [SANDBOX]


def test_attach_twice_is_refused(env):
    network = env.network()
    attach(network, env.netns)
    with pytest.raises(AlreadyExists):
        attach(network, env.netns)


def test_attach_needs_an_existing_netns(env):
    with pytest.raises(FailedPrecondition, match="does not exist"):
        attach(env.network(), env.netns.parent / "nope")


def test_ready_reports_missing_plugins_including_ipam(env, tmp_path):
    assert env.network().ready() == (True, "")
    conflist = env.conflist(p0={"ipam": {"type": "dhcp-nope"}}, p2={"type": "missing"})
    ok, reason = env.network(conflist).ready()
    assert not ok
    assert "dhcp-nope" in reason and "missing" in reason and "testnet" in reason
    with pytest.raises(CNIConfigError, match="missing"):
        attach(env.network(conflist), env.netns)


@pytest.mark.parametrize(
    "mapping",
    [PortMapping(80, 80, "icmp"), PortMapping(70000, 80), PortMapping(80, 0), PortMapping(80, 80, "tcp", "not-ip")],
)
def test_bad_port_mappings_are_invalid(env, mapping):
    with pytest.raises(InvalidArgument):
        attach(env.network(), env.netns, [mapping])
    assert env.calls() == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 200])
def test_bad_sandbox_ids_are_invalid(env, bad):
    with pytest.raises(InvalidArgument):
        env.network().detach(bad, None)


def test_cni_args_refuse_separators(env):
    with pytest.raises(InvalidArgument, match="K8S_POD_NAME"):
        env.network().attach(SANDBOX, env.netns, "web;x=y", "default", "uid", [])


def test_default_conflist_shape(tmp_path):
    conflist = cni.default_conflist("pyshim", "pyshim0", "10.88.0.0/16", tmp_path / "ipam")
    cni.validate_conflist(conflist)
    bridge, portmap = conflist["plugins"]
    assert conflist["cniVersion"] == "1.0.0"
    assert bridge["type"] == "bridge" and bridge["bridge"] == "pyshim0"
    assert bridge["isGateway"] and bridge["hairpinMode"]
    assert bridge["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(tmp_path / "ipam"),
    }
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    with pytest.raises(ValueError):
        cni.default_conflist("pyshim", "pyshim0", "10.88.0.1/16", tmp_path)


def test_load_conflist(tmp_path, env):
    good = tmp_path / "net.conflist"
    good.write_text(json.dumps(env.conflist()))
    assert cni.load_conflist(good)["name"] == "testnet"

    for content, error in [
        ("{not json", "not valid JSON"),
        (json.dumps({"name": "n", "cniVersion": "0.2.0", "plugins": [{"type": "x"}]}), "cniVersion"),
        (json.dumps({"name": "n", "cniVersion": "1.0.0", "plugins": []}), "plugins"),
        (json.dumps({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../bin/sh"}]}), "invalid type"),
        (json.dumps({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}), "name"),
    ]:
        bad = tmp_path / "bad.conflist"
        bad.write_text(content)
        with pytest.raises(CNIConfigError, match=error):
            cni.load_conflist(bad)
    with pytest.raises(CNIConfigError, match="reading"):
        cni.load_conflist(tmp_path / "absent.conflist")


def test_attachment_round_trips_and_parses_older_results():
    attachment = NetworkAttachment.from_result(BRIDGE_RESULT, "eth0")
    assert NetworkAttachment.from_dict(json.loads(json.dumps(attachment.to_dict()))) == attachment

    # 0.4.0 results carry "version"; a plugin may omit interface indexes
    old = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "192.168.5.7/20"}]}
    parsed = NetworkAttachment.from_result(old, "eth0")
    assert (parsed.ip, parsed.prefix_len, parsed.gateway, parsed.mac) == ("192.168.5.7", 20, "", "")

    empty = NetworkAttachment.from_result({"cniVersion": "1.0.0"}, "eth0")
    assert empty.ip == "" and empty.interface == "eth0"


def test_port_mapping_round_trip():
    mapping = PortMapping(8080, 80, "udp", "127.0.0.1")
    assert PortMapping.from_dict(mapping.to_dict()) == mapping


def test_stray_cni_env_of_the_daemon_does_not_leak(env, monkeypatch):
    monkeypatch.setenv("CNI_ARGS", "EVIL=1")
    monkeypatch.setenv("CNI_EXTRA", "x")
    attach(env.network(), env.netns)
    call = env.calls()[0]["env"]
    assert "EVIL" not in call["CNI_ARGS"] and "CNI_EXTRA" not in call

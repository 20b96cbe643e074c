"""The scans behind sandbox recovery, on files laid out as host-local and the CNI cache lay them out."""
import tempfile
from pathlib import Path

import pytest

from pyshim.internal import sandbox_leftovers
from pyshim.internal.cni import cache_temp_files, default_conflist, host_local_network_dirs
from pyshim.internal.sandbox_manager import RUN_STEPS, _reached
from pyshim.internal.intents import Intent, Operation


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="pyshim-leftovers-test-") as d:
        yield Path(d)


def test_host_local_allocations_name_their_owner_in_either_file_format(tmp_path):
    (tmp_path / "10.0.0.2").write_bytes(b"aaaa\r\neth0")  # host-local >= 0.9: id and ifname
    (tmp_path / "10.0.0.3").write_text("bbbb")  # older host-local: the id alone
    (tmp_path / "10.0.0.4").write_text("")
    (tmp_path / "lock").write_text("")
    (tmp_path / "last_reserved_ip.0").write_text("10.0.0.4")
    found = {(a.ip, a.owner) for a in sandbox_leftovers.host_local_allocations(tmp_path)}
    assert found == {("10.0.0.2", "aaaa"), ("10.0.0.3", "bbbb"), ("10.0.0.4", "")}
    assert sandbox_leftovers.host_local_allocations(tmp_path / "missing") == []


def test_only_host_local_with_its_own_data_dir_is_swept(tmp_path):
    conflist = default_conflist("net1", "br1", "10.9.0.0/24", tmp_path / "networks")
    assert host_local_network_dirs(conflist) == [tmp_path / "networks" / "net1"]
    # No dataDir: host-local's default directory is shared with every other runtime on the node.
    del conflist["plugins"][0]["ipam"]["dataDir"]
    assert host_local_network_dirs(conflist) == []


def test_netns_names_with_prefix(tmp_path):
    for name in ("pfx-a", "pfx-b", "other-c"):
        (tmp_path / name).write_text("")
    assert sandbox_leftovers.netns_names_with_prefix(tmp_path, "pfx-") == ["pfx-a", "pfx-b"]
    assert sandbox_leftovers.netns_names_with_prefix(tmp_path, "") == []


def test_half_written_cache_records_are_found(tmp_path):
    (tmp_path / "abc.json").write_text("{}")
    (tmp_path / ".abc.x1y2.tmp").write_text("{")
    assert cache_temp_files(tmp_path) == [tmp_path / ".abc.x1y2.tmp"]
    assert cache_temp_files(tmp_path / "missing") == []


def test_a_run_intent_reached_cni_add_only_from_that_step_on():
    def intent(step):
        return Intent(id="1", operation=Operation.RUN_SANDBOX, target="s", step=step, started_at_ns=0)
    reached = [step for step in RUN_STEPS if _reached(intent(step), "cni_add")]
    assert reached == list(RUN_STEPS[RUN_STEPS.index("cni_add"):])
    assert not _reached(intent("unknown-step"), "cni_add")

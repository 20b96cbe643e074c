"""Host feature detection."""
from pyshim.internal.host_caps import kernel_at_least, recursive_read_only_mounts


def test_kernel_release_comparison():
    assert kernel_at_least(5, 12, "6.18.0-1-amd64") and kernel_at_least(5, 12, "5.12.0")
    assert not kernel_at_least(5, 12, "5.10.0-28-amd64") and not kernel_at_least(5, 12, "weird")


def test_recursive_read_only_needs_runcs_rro_option():
    assert not recursive_read_only_mounts(frozenset({"ro", "rbind"}))

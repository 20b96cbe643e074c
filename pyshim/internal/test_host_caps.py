"""Host feature detection."""
from pyshim.internal.host_caps import kernel_at_least, recursive_read_only_mounts


def test_kernel_release_comparison():
    assert kernel_at_least(5, 12, "6.18.0-1-amd64") and kernel_at_least(5, 12, "5.12.0")
    assert not kernel_at_least(5, 12, "5.10.0-28-amd64") and not kernel_at_least(5, 12, "weird")


def test_recursive_read_only_needs_runcs_rro_option():
    assert not recursive_read_only_mounts(frozenset({"ro", "rbind"}))


def test_lazy_page_server_needs_big_pipes_or_cap_sys_resource():
    from pyshim.internal.host_caps import CAP_SYS_RESOURCE, lazy_page_server_problem

    problem = lazy_page_server_problem(capabilities=0, pipe_max=1048576)
    assert "fs.pipe-max-size is 1048576" in problem and "sysctl -w fs.pipe-max-size=4194304" in problem
    assert lazy_page_server_problem(capabilities=0, pipe_max=4194304) == ""
    assert lazy_page_server_problem(capabilities=1 << CAP_SYS_RESOURCE, pipe_max=1048576) == ""


import pytest

from pyshim.errors import InvalidArgument
from pyshim.internal.request_paths import check_cgroup_parent, check_log_directory, container_log_path


def test_kubelets_paths_are_accepted():
    assert container_log_path("/var/log/pods/ns_pod_uid", "main/0.log") == "/var/log/pods/ns_pod_uid/main/0.log"
    assert container_log_path("/var/log/pods/x/", "main.log") == "/var/log/pods/x/main.log"
    assert container_log_path("", "") == ""
    check_log_directory("")
    check_cgroup_parent("/kubepods/burstable/pod0b5e0cc1-5d4c-4dc4-b1e3-3c7c4f2bd2c4")
    check_cgroup_parent("/kubepods/")
    check_cgroup_parent("")


@pytest.mark.parametrize("log_path", ["../../etc/x", "/etc/x", "a/../../b", "./a.log", "a//b.log", "a/", "x\0y"])
def test_log_paths_outside_the_pods_directory_are_refused(log_path):
    with pytest.raises(InvalidArgument, match="log_path"):
        container_log_path("/var/log/pods/p", log_path)


def test_a_relative_log_path_needs_an_absolute_log_directory():
    with pytest.raises(InvalidArgument, match="no log_directory"):
        container_log_path("", "main/0.log")
    with pytest.raises(InvalidArgument, match="absolute"):
        container_log_path("logs", "main/0.log")


@pytest.mark.parametrize("directory", ["logs", "./logs", "/var/log/../../etc"])
def test_bad_log_directories_are_refused(directory):
    with pytest.raises(InvalidArgument, match="log_directory"):
        check_log_directory(directory)


@pytest.mark.parametrize("parent", ["/kubepods/../../escape", "kubepods/burstable", "/a//b", "/a/./b", "..", "/x\n"])
def test_bad_cgroup_parents_are_refused(parent):
    with pytest.raises(InvalidArgument, match="cgroup_parent"):
        check_cgroup_parent(parent)

"""Version, Status, RuntimeConfig, UpdateRuntimeConfig."""
from __future__ import annotations

import json

from cri_api import api_pb2 as cri
from oci.seccomp import profile as seccomp
from pyshim import __version__
from pyshim.internal import host_caps
from pyshim.internal.host_caps import recursive_read_only_mounts
from pyshim.server.runtime import RUNTIME_API_VERSION, RUNTIME_NAME, Runtime


def version(rt: Runtime, request) -> "cri.VersionResponse":
    return cri.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=__version__,
                               runtime_api_version=RUNTIME_API_VERSION)


def status(rt: Runtime, request) -> "cri.StatusResponse":
    runtime_ready = cri.RuntimeCondition(type="RuntimeReady", status=True)
    net_ok, net_reason = rt.sandboxes.network_ready()
    network_ready = cri.RuntimeCondition(
        type="NetworkReady", status=net_ok,
        reason="" if net_ok else "NetworkPluginNotReady", message="" if net_ok else net_reason)
    info = {}
    if request.verbose:
        info["config"] = json.dumps({
            "socket": rt.config.socket, "root": rt.config.root, "stateDir": rt.config.state_dir,
            "runc": rt.runc_version, "conmon": rt.conmon_version, "cgroupDriver": "cgroupfs",
            "network": {"name": rt.config.network.name, "subnet": rt.config.network.subnet},
        })
    # Like CRI-O: whether checkpoint/restore can work here, and why not, for people and tools.
    criu = rt.checkpointer.criu
    info["checkpointRestore"] = json.dumps({
        "checkpointEnabled": rt.config.checkpoint.enable_checkpoint,
        "restoreEnabled": rt.config.checkpoint.enable_restore,
        "criuVersion": criu.version, "criuUsable": criu.usable, "reason": criu.reason,
        # Why this node cannot be the source of `pyshim migrate --lazy` ("" = it can).
        "lazySourceProblem": host_caps.lazy_page_server_problem(),
    })
    # What seccomp a container gets: kubelet's SeccompDefault relies on RuntimeDefault being enforced.
    info["seccomp"] = json.dumps(seccomp.enforcement_summary())
    features = cri.RuntimeHandlerFeatures(
        recursive_read_only_mounts=recursive_read_only_mounts(rt.containers.runc_mount_options()))
    # The default handler ("") and its name "runc", as containerd lists them: both are runc here.
    handlers = [cri.RuntimeHandler(name=name, features=features) for name in ("", "runc")]
    # SupplementalGroupsPolicy (Merge and Strict) is applied when the spec is built, and
    # ContainerStatus.user reports the identity that resulted.
    return cri.StatusResponse(status=cri.RuntimeStatus(conditions=[runtime_ready, network_ready]), info=info,
                              runtime_handlers=handlers,
                              features=cri.RuntimeFeatures(supplemental_groups_policy=True))


def runtime_config(rt: Runtime, request) -> "cri.RuntimeConfigResponse":
    # There is no systemd on these nodes: kubelet must use the cgroupfs driver too.
    return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CGROUPFS))


def update_runtime_config(rt: Runtime, request) -> "cri.UpdateRuntimeConfigResponse":
    # The pod CIDR kubelet sends is informational for us: the embedded network has its own subnet.
    return cri.UpdateRuntimeConfigResponse()

"""Wire-compatibility checks for the generated CRI v1 modules.

The expected values are written out by hand from upstream's api.proto
(kubernetes staging/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto), not
read back from the generated descriptors, so a bad edit of cri_api/api.proto
or a broken generation step fails here.
"""

import pathlib

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from cri_api import api_pb2 as cri
from cri_api import api_pb2_grpc

STR, BOOL, I64, I32, U32, U64, BYTES, MSG, ENUM = (
    FD.TYPE_STRING, FD.TYPE_BOOL, FD.TYPE_INT64, FD.TYPE_INT32, FD.TYPE_UINT32,
    FD.TYPE_UINT64, FD.TYPE_BYTES, FD.TYPE_MESSAGE, FD.TYPE_ENUM,
)

RUNTIME_RPCS = [
    "Version",
    "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus",
    "ListPodSandbox", "StreamPodSandboxes",
    "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
    "ListContainers", "StreamContainers", "ContainerStatus",
    "UpdateContainerResources", "ReopenContainerLog",
    "ExecSync", "Exec", "Attach", "PortForward",
    "ContainerStats", "ListContainerStats", "StreamContainerStats",
    "PodSandboxStats", "ListPodSandboxStats", "StreamPodSandboxStats",
    "UpdateRuntimeConfig", "Status", "CheckpointContainer", "CheckpointPod", "RestorePod",
    "GetContainerEvents",
    "ListMetricDescriptors", "ListPodSandboxMetrics", "StreamPodSandboxMetrics",
    "RuntimeConfig", "UpdatePodSandboxResources",
]
IMAGE_RPCS = ["ListImages", "StreamImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"]
SERVER_STREAMING = {
    "StreamPodSandboxes", "StreamContainers", "StreamContainerStats",
    "StreamPodSandboxStats", "GetContainerEvents", "StreamPodSandboxMetrics",
    "StreamImages",
}


def _repeated(field):
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FD.LABEL_REPEATED


def _shape(message, name):
    """(number, wire-level type, repeated, referenced type name or None)."""
    field = message.DESCRIPTOR.fields_by_name[name]
    ref = field.message_type or field.enum_type
    return field.number, field.type, _repeated(field), ref.name if ref else None


def _check(message, expected):
    actual = {name: _shape(message, name) for name in message.DESCRIPTOR.fields_by_name}
    assert actual == expected


def test_package_and_services():
    assert cri.DESCRIPTOR.package == "runtime.v1"
    assert cri.DESCRIPTOR.name == "cri_api/api.proto"
    assert sorted(cri.DESCRIPTOR.services_by_name) == ["ImageService", "RuntimeService"]


@pytest.mark.parametrize("service,rpcs", [("RuntimeService", RUNTIME_RPCS), ("ImageService", IMAGE_RPCS)])
def test_service_methods_match_upstream(service, rpcs):
    desc = cri.DESCRIPTOR.services_by_name[service]
    assert [m.name for m in desc.methods] == rpcs
    for m in desc.methods:
        assert not m.client_streaming, m.name
        assert m.server_streaming == (m.name in SERVER_STREAMING), m.name


def test_method_message_types():
    rt = cri.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name
    assert rt["GetContainerEvents"].input_type.name == "GetEventsRequest"
    assert rt["GetContainerEvents"].output_type.name == "ContainerEventResponse"
    assert rt["CheckpointContainer"].input_type.name == "CheckpointContainerRequest"
    assert rt["CheckpointContainer"].output_type.name == "CheckpointContainerResponse"
    assert rt["RuntimeConfig"].output_type.name == "RuntimeConfigResponse"
    assert rt["CheckpointPod"].input_type.name == "CheckpointPodRequest"
    assert rt["CheckpointPod"].output_type.name == "CheckpointPodResponse"
    assert rt["RestorePod"].input_type.name == "RestorePodRequest"
    assert rt["RestorePod"].output_type.name == "RestorePodResponse"
    img = cri.DESCRIPTOR.services_by_name["ImageService"].methods_by_name
    assert img["ImageFsInfo"].output_type.name == "ImageFsInfoResponse"


class _RecordingChannel:
    """Just enough of grpc.Channel to see which paths a stub would call."""

    def __init__(self):
        self.calls = {}

    def _record(self, kind):
        def make(path, request_serializer=None, response_deserializer=None, _registered_method=None):
            self.calls[path] = kind
            return object()
        return make

    def __getattr__(self, kind):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


@pytest.mark.parametrize("service,rpcs", [("RuntimeService", RUNTIME_RPCS), ("ImageService", IMAGE_RPCS)])
def test_stub_method_paths(service, rpcs):
    # kubelet calls e.g. /runtime.v1.RuntimeService/Version; a wrong package
    # or method name would make every call UNIMPLEMENTED.
    channel = _RecordingChannel()
    getattr(api_pb2_grpc, service + "Stub")(channel)
    assert channel.calls == {
        f"/runtime.v1.{service}/{rpc}": "unary_stream" if rpc in SERVER_STREAMING else "unary_unary"
        for rpc in rpcs
    }
    servicer = getattr(api_pb2_grpc, service + "Servicer")
    for rpc in rpcs:
        assert callable(getattr(servicer, rpc))


def test_checkpoint_container_request_fields():
    _check(cri.CheckpointContainerRequest, {
        "container_id": (1, STR, False, None),
        "location": (2, STR, False, None),
        "timeout": (3, I64, False, None),
    })


def test_container_config_fields():
    _check(cri.ContainerConfig, {
        "metadata": (1, MSG, False, "ContainerMetadata"),
        "image": (2, MSG, False, "ImageSpec"),
        "command": (3, STR, True, None),
        "args": (4, STR, True, None),
        "working_dir": (5, STR, False, None),
        "envs": (6, MSG, True, "KeyValue"),
        "mounts": (7, MSG, True, "Mount"),
        "devices": (8, MSG, True, "Device"),
        "labels": (9, MSG, True, "LabelsEntry"),
        "annotations": (10, MSG, True, "AnnotationsEntry"),
        "log_path": (11, STR, False, None),
        "stdin": (12, BOOL, False, None),
        "stdin_once": (13, BOOL, False, None),
        "tty": (14, BOOL, False, None),
        "linux": (15, MSG, False, "LinuxContainerConfig"),
        "windows": (16, MSG, False, "WindowsContainerConfig"),
        "CDI_devices": (17, MSG, True, "CDIDevice"),
        "stop_signal": (18, ENUM, False, "Signal"),
    })
    labels = cri.ContainerConfig.DESCRIPTOR.fields_by_name["labels"].message_type
    assert labels.GetOptions().map_entry


def test_pod_checkpoint_messages():
    # cri-api v0.37 (KEP-5823): CheckpointPod and RestorePod.
    _check(cri.CheckpointPodRequest, {
        "pod_sandbox_id": (1, STR, False, None),
        "output_path": (2, STR, False, None),
        "container_ids": (3, STR, True, None),
        "options": (4, MSG, True, "OptionsEntry"),
    })
    _check(cri.CheckpointPodResponse, {})
    _check(cri.RestorePodRequest, {
        "checkpoint_path": (1, STR, False, None),
        "config": (2, MSG, False, "PodSandboxConfig"),
        "runtime_handler": (3, STR, False, None),
        "options": (4, MSG, True, "OptionsEntry"),
        "container_configs": (5, MSG, True, "ContainerConfig"),
    })
    _check(cri.RestoredContainer, {"name": (1, STR, False, None), "container_id": (2, STR, False, None)})
    _check(cri.RestorePodResponse, {
        "pod_sandbox_id": (1, STR, False, None),
        "restored_containers": (2, MSG, True, "RestoredContainer"),
    })
    for message in (cri.CheckpointPodRequest, cri.RestorePodRequest):
        assert message.DESCRIPTOR.fields_by_name["options"].message_type.GetOptions().map_entry
    _check(cri.RuntimeFeatures, {
        "supplemental_groups_policy": (1, BOOL, False, None),
        "user_namespaces_host_network": (2, BOOL, False, None),
        "mount_options": (3, BOOL, False, None),
    })


def test_pod_checkpoint_request_exact_bytes():
    # Hand-encoded: field 1 (LEN) "p", field 2 (LEN) "/o", field 3 (LEN) "a", field 3 (LEN) "b",
    # field 4 (LEN) map entry {1: "k", 2: "v"}.
    req = cri.CheckpointPodRequest(pod_sandbox_id="p", output_path="/o", container_ids=["a", "b"],
                                   options={"k": "v"})
    assert req.SerializeToString() == b"\x0a\x01p\x12\x02/o\x1a\x01a\x1a\x01b\x22\x06\x0a\x01k\x12\x01v"
    resp = cri.RestorePodResponse.FromString(b"\x0a\x01s\x12\x08\x0a\x02n1\x12\x02c1")
    assert resp.pod_sandbox_id == "s"
    assert [(c.name, c.container_id) for c in resp.restored_containers] == [("n1", "c1")]


def test_other_messages_pyshim_relies_on():
    _check(cri.KeyValue, {"key": (1, STR, False, None), "value": (2, STR, False, None)})
    _check(cri.ContainerMetadata, {"name": (1, STR, False, None), "attempt": (2, U32, False, None)})
    _check(cri.PodSandboxMetadata, {
        "name": (1, STR, False, None), "uid": (2, STR, False, None),
        "namespace": (3, STR, False, None), "attempt": (4, U32, False, None),
    })
    _check(cri.ExecSyncResponse, {
        "stdout": (1, BYTES, False, None), "stderr": (2, BYTES, False, None),
        "exit_code": (3, I32, False, None),
    })
    _check(cri.Mount, {
        "container_path": (1, STR, False, None), "host_path": (2, STR, False, None),
        "readonly": (3, BOOL, False, None), "selinux_relabel": (4, BOOL, False, None),
        "propagation": (5, ENUM, False, "MountPropagation"),
        "uidMappings": (6, MSG, True, "IDMapping"), "gidMappings": (7, MSG, True, "IDMapping"),
        "recursive_read_only": (8, BOOL, False, None), "image": (9, MSG, False, "ImageSpec"),
        "image_sub_path": (10, STR, False, None), "mount_options": (11, STR, True, None),
    })
    _check(cri.LinuxContainerResources, {
        "cpu_period": (1, I64, False, None), "cpu_quota": (2, I64, False, None),
        "cpu_shares": (3, I64, False, None), "memory_limit_in_bytes": (4, I64, False, None),
        "oom_score_adj": (5, I64, False, None), "cpuset_cpus": (6, STR, False, None),
        "cpuset_mems": (7, STR, False, None),
        "hugepage_limits": (8, MSG, True, "HugepageLimit"),
        "unified": (9, MSG, True, "UnifiedEntry"),
        "memory_swap_limit_in_bytes": (10, I64, False, None),
    })
    _check(cri.LinuxSandboxSecurityContext, {
        "namespace_options": (1, MSG, False, "NamespaceOption"),
        "selinux_options": (2, MSG, False, "SELinuxOption"),
        "run_as_user": (3, MSG, False, "Int64Value"),
        "run_as_group": (8, MSG, False, "Int64Value"),
        "readonly_rootfs": (4, BOOL, False, None),
        "supplemental_groups": (5, I64, True, None),
        "supplemental_groups_policy": (11, ENUM, False, "SupplementalGroupsPolicy"),
        "privileged": (6, BOOL, False, None),
        "seccomp": (9, MSG, False, "SecurityProfile"),
        "apparmor": (10, MSG, False, "SecurityProfile"),
        "seccomp_profile_path": (7, STR, False, None),
    })


def test_enum_values():
    assert cri.ContainerState.Value("CONTAINER_CREATED") == 0
    assert cri.ContainerState.Value("CONTAINER_RUNNING") == 1
    assert cri.ContainerState.Value("CONTAINER_EXITED") == 2
    assert cri.ContainerState.Value("CONTAINER_UNKNOWN") == 3
    assert cri.PodSandboxState.Value("SANDBOX_READY") == 0
    assert cri.PodSandboxState.Value("SANDBOX_NOTREADY") == 1
    assert [cri.NamespaceMode.Value(n) for n in ("POD", "CONTAINER", "NODE", "TARGET")] == [0, 1, 2, 3]
    assert [cri.ContainerEventType.Value(n) for n in (
        "CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT",
        "CONTAINER_STOPPED_EVENT", "CONTAINER_DELETED_EVENT")] == [0, 1, 2, 3]
    assert cri.CgroupDriver.Value("SYSTEMD") == 0
    assert cri.CgroupDriver.Value("CGROUPFS") == 1
    assert cri.Signal.Value("SIGKILL") == 13
    assert cri.Signal.Value("SIGTERM") == 23
    assert cri.Signal.Value("SIGRTMAX") == 65


def test_checkpoint_request_exact_bytes():
    # Hand-encoded: field 1 (LEN) "abc", field 2 (LEN) "/x", field 3 (VARINT) 5.
    req = cri.CheckpointContainerRequest(container_id="abc", location="/x", timeout=5)
    assert req.SerializeToString() == b"\x0a\x03abc\x12\x02/x\x18\x05"
    parsed = cri.CheckpointContainerRequest.FromString(b"\x18\x07\x0a\x01c")
    assert (parsed.container_id, parsed.location, parsed.timeout) == ("c", "", 7)


def test_create_container_round_trip():
    req = cri.CreateContainerRequest(
        pod_sandbox_id="pod-1",
        config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="app", attempt=2),
            image=cri.ImageSpec(image="sha256:" + "a" * 64, user_specified_image="busybox"),
            command=["/bin/sh"],
            args=["-c", "sleep 1"],
            working_dir="/",
            envs=[cri.KeyValue(key="PATH", value="/bin"), cri.KeyValue(key="U", value="\u00e9")],
            mounts=[cri.Mount(container_path="/data", host_path="/tmp/d", readonly=True,
                              propagation=cri.PROPAGATION_HOST_TO_CONTAINER)],
            labels={"io.kubernetes.container.name": "app"},
            annotations={"a": "b"},
            log_path="app/2.log",
            tty=True,
            linux=cri.LinuxContainerConfig(
                resources=cri.LinuxContainerResources(memory_limit_in_bytes=1 << 30, unified={"memory.high": "max"}),
                security_context=cri.LinuxContainerSecurityContext(
                    run_as_user=cri.Int64Value(value=0), masked_paths=["/proc/kcore"]),
            ),
            stop_signal=cri.SIGTERM,
        ),
        sandbox_config=cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name="p", uid="u", namespace="default"),
        ),
    )
    data = req.SerializeToString()
    back = cri.CreateContainerRequest.FromString(data)
    assert back == req
    assert back.config.envs[1].value == "\u00e9"
    assert back.config.linux.security_context.HasField("run_as_user")
    assert back.config.linux.resources.unified["memory.high"] == "max"
    # Unknown fields (e.g. from a newer kubelet) survive a parse/serialize cycle.
    newer = data + b"\xf8\x3e\x01"  # field 1000, varint 1
    assert cri.CreateContainerRequest.FromString(newer).SerializeToString() == newer


def test_vendored_proto_has_no_gogoproto():
    text = (pathlib.Path(__file__).with_name("api.proto")).read_text()
    assert "gogo.proto" not in text
    assert "(gogoproto." not in text
    assert "package runtime.v1;" in text


def test_build_module_regenerates(tmp_path):
    from cri_api import _build

    written = _build.generate(out_dir=tmp_path)
    assert sorted(p.name for p in written) == ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"]
    grpc_src = (tmp_path / "cri_api" / "api_pb2_grpc.py").read_text()
    assert "from cri_api import api_pb2" in grpc_src
    assert (tmp_path / "cri_api" / "api_pb2.py").read_text() == \
        (pathlib.Path(cri.__file__)).read_text()

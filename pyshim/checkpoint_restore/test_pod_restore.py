import pytest

from cri_api import api_pb2 as cri
from criu_glue import pod_checkpoint as podfmt
from pyshim.errors import FailedPrecondition, InvalidArgument
from pyshim.checkpoint_restore import pod_restore as pr


def config(name="app", **kwargs) -> "cri.ContainerConfig":
    c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image="busybox:1"),
                            command=["sh"], args=["-c", "sleep 1"], working_dir="/w",
                            envs=[cri.KeyValue(key="A", value="1")])
    for key, value in kwargs.items():
        setattr(c, key, value)
    return c


def manifest(*names, tcp="auto", conns=()) -> podfmt.PodManifest:
    return podfmt.PodManifest(pod_id="p", pod_config={}, pod_ips=(), tcp=tcp, containers=tuple(
        podfmt.PodContainer(i, n, f"id{i}", {}, tuple(conns)) for i, n in enumerate(names)))


def test_request_shape():
    pr.check_request_shape("", {}, [config("a")])
    pr.check_request_shape("runc", {}, [config("a"), config("b")])
    with pytest.raises(InvalidArgument, match="runtime handler"):
        pr.check_request_shape("kata", {}, [config("a")])
    with pytest.raises(InvalidArgument, match="options"):
        pr.check_request_shape("", {"tcp": "close"}, [config("a")])
    with pytest.raises(InvalidArgument, match="empty"):
        pr.check_request_shape("", {}, [])
    with pytest.raises(InvalidArgument, match="more than once"):
        pr.check_request_shape("", {}, [config("a"), config("a")])
    with pytest.raises(InvalidArgument, match="non-empty"):
        pr.check_request_shape("", {}, [config("")])


def test_names_must_be_exactly_the_checkpoints():
    pr.check_names(manifest("a", "b"), [config("b"), config("a")])
    with pytest.raises(InvalidArgument, match=r"missing \['b'\]"):
        pr.check_names(manifest("a", "b"), [config("a")])
    with pytest.raises(InvalidArgument, match=r"not in the checkpoint \['c'\]"):
        pr.check_names(manifest("a"), [config("a"), config("c")])


def _same(a, b):
    return False


def test_matching_fields():
    pr.check_matches("app", config(), config(), _same)
    for field, value in (("command", ["bash"]), ("args", ["-c", "sleep 2"]), ("working_dir", "/x")):
        changed = config()
        if isinstance(value, list):
            getattr(changed, field)[:] = value
        else:
            setattr(changed, field, value)
        with pytest.raises(FailedPrecondition, match="app"):
            pr.check_matches("app", changed, config(), _same)
    env = config()
    env.envs[0].value = "2"
    with pytest.raises(FailedPrecondition, match=r"environment differs .*\['A'\]"):
        pr.check_matches("app", env, config(), _same)
    user = config()
    user.linux.security_context.run_as_user.value = 0
    with pytest.raises(FailedPrecondition, match="credentials"):
        pr.check_matches("app", user, config(), _same)
    image = config()
    image.image.image = "alpine:3"
    with pytest.raises(FailedPrecondition, match="image"):
        pr.check_matches("app", image, config(), _same)
    # The same image under another reference (e.g. the kubelet's resolved ID) matches.
    pr.check_matches("app", image, config(), lambda a, b: True)
    named = config()
    named.image.image, named.image.user_specified_image = "sha256:" + "a" * 64, "busybox:1"
    pr.check_matches("app", named, config(), _same)


def test_shared_pid_namespaces_are_refused():
    pod = cri.PodSandboxConfig()
    pod.linux.security_context.namespace_options.pid = cri.NamespaceMode.CONTAINER  # kubelet's default
    pr.check_namespaces(pod, [config()])
    pod.linux.security_context.namespace_options.pid = cri.NamespaceMode.POD
    with pytest.raises(FailedPrecondition, match="share a PID namespace"):
        pr.check_namespaces(pod, [config()])
    target = config()
    target.linux.security_context.namespace_options.pid = cri.NamespaceMode.TARGET
    with pytest.raises(FailedPrecondition, match="targets another container"):
        pr.check_namespaces(cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(
                pid=cri.NamespaceMode.CONTAINER)))), [target])


def test_tcp_decisions():
    loop = podfmt.TcpConnection("127.0.0.1", 1, "127.0.0.1", 2)
    outside = podfmt.TcpConnection("10.0.0.5", 1, "1.1.1.1", 443)
    m = manifest("a", conns=(loop,))
    assert pr.tcp_annotation(m, m.containers[0]) == "established"
    assert pr.loopback_connections(m) == [loop]
    m = manifest("a", conns=(loop, outside))
    assert pr.tcp_annotation(m, m.containers[0]) == ""  # the container restore's own policy
    m = manifest("a", conns=())
    assert pr.tcp_annotation(m, m.containers[0]) == ""
    m = manifest("a", tcp="close", conns=(loop,))
    assert pr.tcp_annotation(m, m.containers[0]) == "close"


def test_checkpointed_config_parses_and_refuses_garbage():
    entry = podfmt.PodContainer(0, "a", "id", {"metadata": {"name": "a"}, "command": ["sh"], "future": 1})
    assert list(pr.checkpointed_config(entry).command) == ["sh"]
    with pytest.raises(InvalidArgument, match="malformed"):
        pr.checkpointed_config(podfmt.PodContainer(0, "a", "id", {"command": "not-a-list-of-strings" * 0 or 5}))

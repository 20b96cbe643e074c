"""Tests for oci.runtime_spec: CRI CreateContainerRequest -> runtime-spec config.json.

Every spec built here also goes through validate_spec, and one test hands a
built spec to the real runc.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cri_api import api_pb2 as cri
from oci import runtime_spec as rs
from oci.image_config import ImageConfig
from oci.runtime_spec import ContainerSpecInput, SpecInputError, build_container_spec
from oci.spec_schema import validate_spec

POD_NS = {"network": "/var/run/netns/pod1", "ipc": "/proc/42/ns/ipc", "uts": "/proc/42/ns/uts",
          "pid": None, "mount": None}


def container_config(**kwargs) -> cri.ContainerConfig:
    kwargs.setdefault("metadata", cri.ContainerMetadata(name="app", attempt=1))
    kwargs.setdefault("image", cri.ImageSpec(image="docker.io/library/busybox:1.36"))
    return cri.ContainerConfig(**kwargs)


def security_context(**kwargs) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**kwargs))


def sandbox_config() -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web-0", namespace="shop", uid="pod-uid-1", attempt=0),
        hostname="web-0")


def spec_input(config=None, image=None, rootfs="/run/pyshim/rootfs/c1", **kwargs) -> ContainerSpecInput:
    fields = dict(
        container_id="c1", rootfs=rootfs, config=config or container_config(),
        sandbox_config=sandbox_config(),
        image_config=image or ImageConfig(entrypoint=["/docker-entrypoint.sh"], cmd=["serve"]),
        namespaces=dict(POD_NS), hostname="web-0", sandbox_files={}, cgroups_path="/pyshim/pod1/c1",
        annotations={}, sysctls={}, sandbox_id="sandbox-123")
    fields.update(kwargs)
    return ContainerSpecInput(**fields)


def build(inp: ContainerSpecInput) -> dict:
    spec = build_container_spec(inp)
    validate_spec(spec)
    json.dumps(spec)  # must be serialisable as is
    return spec


def mount_at(spec: dict, destination: str) -> dict:
    matches = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(matches) == 1, f"{destination}: {matches}"
    return matches[0]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A rootfs with users and groups, /etc/passwd being a symlink inside the image."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "# a comment\n"
        "app:x:1000:1000:app:/home/app:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/:/bin/false\n")
    # absolute target: must resolve inside the rootfs, not to the host's /usr/lib/passwd
    (root / "etc/passwd").symlink_to("/usr/lib/passwd")
    (root / "etc/group").write_text(
        "root:x:0:\n"
        "app:x:1000:\n"
        "staff:x:50:app,other\n"
        "audio:x:29:app\n"
        "video:x:44:other\n")
    return root


# --- the plain case -------------------------------------------------------

def test_plain_request_gets_containerd_defaults():
    spec = build(spec_input())
    process, linux = spec["process"], spec["linux"]
    assert spec["ociVersion"] == "1.0.2"
    assert spec["root"] == {"path": "/run/pyshim/rootfs/c1", "readonly": False}
    assert process["args"] == ["/docker-entrypoint.sh", "serve"]
    assert process["env"] == [rs.DEFAULT_PATH_ENV, "HOSTNAME=web-0"]
    assert process["cwd"] == "/"
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["terminal"] is False
    assert process["noNewPrivileges"] is False
    assert "oomScoreAdj" not in process
    assert process["capabilities"]["bounding"] == list(rs.DEFAULT_CAPABILITIES)
    assert process["capabilities"]["effective"] == list(rs.DEFAULT_CAPABILITIES)
    assert "ambient" not in process["capabilities"]
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": rs.nofile_limit(), "soft": rs.nofile_limit()}]
    assert [m["destination"] for m in spec["mounts"]] == [
        "/proc", "/dev", "/sys", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"]
    assert "ro" in mount_at(spec, "/sys")["options"]
    assert "ro" in mount_at(spec, "/sys/fs/cgroup")["options"]
    assert linux["maskedPaths"] == list(rs.DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(rs.DEFAULT_READONLY_PATHS)
    assert linux["cgroupsPath"] == "/pyshim/pod1/c1"
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert linux["devices"] == []
    assert "seccomp" not in linux  # no seccomp field and no seccomp_profile_path: unconfined, as in containerd
    assert "sysctl" not in linux
    assert spec["hostname"] == "web-0"


def test_nofile_limit_never_exceeds_what_this_process_holds():
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert rs.nofile_limit() <= rs.NOFILE_LIMIT
    if hard != resource.RLIM_INFINITY:
        assert rs.nofile_limit() <= hard


def test_annotations_merge_request_daemon_and_cri_keys():
    config = container_config(annotations={"team": "a", rs.ANNOTATION_CONTAINER_TYPE: "spoofed"},
                              image=cri.ImageSpec(image="sha256:abc", user_specified_image="busybox:1.36"))
    spec = build(spec_input(config=config, annotations={"team": "daemon", "pyshim/x": "1"}))
    ann = spec["annotations"]
    assert ann["team"] == "daemon"
    assert ann["pyshim/x"] == "1"
    assert ann[rs.ANNOTATION_CONTAINER_TYPE] == "container"
    assert ann[rs.ANNOTATION_CONTAINER_NAME] == "app"
    assert ann[rs.ANNOTATION_SANDBOX_ID] == "sandbox-123"
    assert ann[rs.ANNOTATION_SANDBOX_NAME] == "web-0"
    assert ann[rs.ANNOTATION_SANDBOX_NAMESPACE] == "shop"
    assert ann[rs.ANNOTATION_SANDBOX_UID] == "pod-uid-1"
    assert ann[rs.ANNOTATION_IMAGE_NAME] == "busybox:1.36"


def test_sandbox_id_may_come_from_the_daemons_annotations():
    spec = build(spec_input(sandbox_id="", annotations={rs.ANNOTATION_SANDBOX_ID: "sb-9"}))
    assert spec["annotations"][rs.ANNOTATION_SANDBOX_ID] == "sb-9"


def test_sysctls_and_oom_score_adj():
    config = container_config(linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(oom_score_adj=500)))
    spec = build(spec_input(config=config, sysctls={"net.ipv4.ip_forward": "1"}))
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    assert spec["process"]["oomScoreAdj"] == 500


# --- process.args / env / cwd ---------------------------------------------

@pytest.mark.parametrize("command, args, entrypoint, cmd, expected", [
    (["/bin/app"], [], ["/ep"], ["dflt"], ["/bin/app"]),              # command drops image Cmd too
    (["/bin/app"], ["-v"], ["/ep"], ["dflt"], ["/bin/app", "-v"]),
    ([], ["-v"], ["/ep"], ["dflt"], ["/ep", "-v"]),                   # args replace Cmd only
    ([], [], ["/ep"], ["dflt"], ["/ep", "dflt"]),
    ([], [], [], ["/bin/sh"], ["/bin/sh"]),
    ([], ["/bin/echo", "hi"], [], ["/bin/sh"], ["/bin/echo", "hi"]),
])
def test_kubernetes_command_and_args_semantics(command, args, entrypoint, cmd, expected):
    config = container_config(command=command, args=args)
    spec = build(spec_input(config=config, image=ImageConfig(entrypoint=entrypoint, cmd=cmd)))
    assert spec["process"]["args"] == expected


def test_nothing_to_run_is_an_input_error():
    with pytest.raises(SpecInputError, match="no command to run"):
        build_container_spec(spec_input(image=ImageConfig()))


def test_request_env_overrides_image_env_by_name():
    image = ImageConfig(entrypoint=["/x"], env=["PATH=/opt/bin:/bin", "FOO=image", "LANG=C.UTF-8"])
    config = container_config(envs=[cri.KeyValue(key="FOO", value="request"), cri.KeyValue(key="BAR", value="a=b")])
    spec = build(spec_input(config=config, image=image))
    assert spec["process"]["env"] == ["HOSTNAME=web-0", "PATH=/opt/bin:/bin", "FOO=request", "LANG=C.UTF-8", "BAR=a=b"]


def test_path_default_only_when_nobody_sets_it():
    config = container_config(envs=[cri.KeyValue(key="PATH", value="/mine")])
    spec = build(spec_input(config=config))
    assert [e for e in spec["process"]["env"] if e.startswith("PATH=")] == ["PATH=/mine"]


@pytest.mark.parametrize("request_dir, image_dir, expected", [
    ("/srv", "/app", "/srv"), ("", "/app", "/app"), ("", "", "/")])
def test_working_dir_precedence(request_dir, image_dir, expected):
    spec = build(spec_input(config=container_config(working_dir=request_dir),
                            image=ImageConfig(cmd=["/x"], working_dir=image_dir)))
    assert spec["process"]["cwd"] == expected


def test_relative_working_dir_is_rejected():
    with pytest.raises(SpecInputError, match="working_dir 'srv' must be an absolute path"):
        build_container_spec(spec_input(config=container_config(working_dir="srv")))


def test_tty_sets_terminal():
    assert build(spec_input(config=container_config(tty=True)))["process"]["terminal"] is True


# --- user -----------------------------------------------------------------

@pytest.mark.parametrize("image_user, uid, gid, extra", [
    ("", 0, 0, None),
    ("app", 1000, 1000, [50, 29]),            # groups where app is a member
    ("app:staff", 1000, 50, [29]),
    ("app:7", 1000, 7, [50, 29]),
    ("1000", 1000, 1000, [50, 29]),           # numeric uid still finds its passwd entry
    ("1000:44", 1000, 44, [50, 29]),
    ("4242", 4242, 0, None),                  # unknown numeric uid is allowed, gid 0
    ("nobody", 65534, 65534, None),
])
def test_image_user_resolved_against_the_rootfs(rootfs, image_user, uid, gid, extra):
    spec = build(spec_input(rootfs=str(rootfs), image=ImageConfig(cmd=["/x"], user=image_user)))
    expected = {"uid": uid, "gid": gid}
    if extra:
        expected["additionalGids"] = extra
    assert spec["process"]["user"] == expected


@pytest.mark.parametrize("image_user, words", [
    ("ghost", "no user 'ghost'"), ("app:wheel", "no group 'wheel'")])
def test_unknown_image_user_or_group_is_an_input_error(rootfs, image_user, words):
    with pytest.raises(SpecInputError, match=words):
        build_container_spec(spec_input(rootfs=str(rootfs), image=ImageConfig(cmd=["/x"], user=image_user)))


def test_named_user_without_passwd_file_is_an_input_error(tmp_path):
    with pytest.raises(SpecInputError, match="no user 'app'"):
        build_container_spec(spec_input(rootfs=str(tmp_path), image=ImageConfig(cmd=["/x"], user="app")))


def test_passwd_symlink_cannot_escape_the_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    # a naive join would land on this file next to the rootfs
    (tmp_path / "outside-passwd").write_text("intruder:x:0:0::/:/bin/sh\n")
    (root / "etc/passwd").symlink_to("../../outside-passwd")
    with pytest.raises(SpecInputError, match="no user 'intruder'"):
        build_container_spec(spec_input(rootfs=str(root), image=ImageConfig(cmd=["/x"], user="intruder")))


def test_symlink_loop_in_the_rootfs_is_an_input_error(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to("/etc/passwd")
    with pytest.raises(SpecInputError, match="too many symlinks"):
        build_container_spec(spec_input(rootfs=str(root), image=ImageConfig(cmd=["/x"], user="app")))


def test_security_context_user_overrides_image_user(rootfs):
    config = container_config(linux=security_context(
        run_as_user=cri.Int64Value(value=1000), run_as_group=cri.Int64Value(value=3000),
        supplemental_groups=[4000, 50]))
    spec = build(spec_input(config=config, rootfs=str(rootfs), image=ImageConfig(cmd=["/x"], user="nobody")))
    assert spec["process"]["user"] == {"uid": 1000, "gid": 3000, "additionalGids": [50, 29, 4000]}


def test_run_as_user_zero_is_honoured_over_the_image_user(rootfs):
    config = container_config(linux=security_context(run_as_user=cri.Int64Value(value=0)))
    spec = build(spec_input(config=config, rootfs=str(rootfs), image=ImageConfig(cmd=["/x"], user="app")))
    assert spec["process"]["user"] == {"uid": 0, "gid": 0}


def test_run_as_username_and_strict_groups(rootfs):
    config = container_config(linux=security_context(run_as_username="app", supplemental_groups_policy=cri.Strict))
    spec = build(spec_input(config=config, rootfs=str(rootfs)))
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000}


def test_unknown_run_as_username_is_an_input_error(rootfs):
    config = container_config(linux=security_context(run_as_username="ghost"))
    with pytest.raises(SpecInputError, match="run_as_username 'ghost'"):
        build_container_spec(spec_input(config=config, rootfs=str(rootfs)))


def test_group_without_user_is_rejected():
    config = container_config(linux=security_context(run_as_group=cri.Int64Value(value=5)))
    with pytest.raises(SpecInputError, match="run_as_group is set without run_as_user"):
        rs.validate_container_config(config)


# --- privileges -----------------------------------------------------------

def test_privileged_gets_host_caps_devices_and_writable_sys():
    config = container_config(linux=security_context(
        privileged=True, masked_paths=["/proc/kcore"], capabilities=cri.Capability(drop_capabilities=["ALL"])))
    spec = build(spec_input(config=config))
    caps = spec["process"]["capabilities"]
    assert caps["bounding"] == rs.host_capabilities()
    assert "CAP_SYS_ADMIN" in caps["bounding"]
    assert spec["linux"]["maskedPaths"] == [] and spec["linux"]["readonlyPaths"] == []
    assert "rw" in mount_at(spec, "/sys")["options"]
    assert "rw" in mount_at(spec, "/sys/fs/cgroup")["options"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    null = [d for d in spec["linux"]["devices"] if d["path"] == "/dev/null"]
    assert null and null[0]["type"] == "c" and (null[0]["major"], null[0]["minor"]) == (1, 3)
    assert not [d for d in spec["linux"]["devices"] if d["path"].startswith("/dev/pts/")]


def test_host_capabilities_follow_the_bounding_set():
    with open("/proc/self/status") as f:
        bnd = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
    for name, bit in rs.CAPABILITY_BITS.items():
        assert (name in rs.host_capabilities()) == bool(bnd & (1 << bit))


def test_readonly_rootfs_and_no_new_privs(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    config = container_config(linux=security_context(readonly_rootfs=True, no_new_privs=True))
    spec = build(spec_input(config=config, sandbox_files={"/etc/hosts": str(hosts)}))
    assert spec["root"]["readonly"] is True
    assert spec["process"]["noNewPrivileges"] is True
    assert mount_at(spec, "/etc/hosts") == {"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
                                            "options": ["rbind", "rprivate", "ro"]}


def test_masked_and_readonly_paths_from_the_request():
    config = container_config(linux=security_context(masked_paths=["/proc/x"], readonly_paths=["/proc/y"]))
    spec = build(spec_input(config=config))
    assert spec["linux"]["maskedPaths"] == ["/proc/x"]
    assert spec["linux"]["readonlyPaths"] == ["/proc/y"]


@pytest.mark.parametrize("add, drop, present, absent", [
    (["NET_ADMIN", "cap_sys_time"], ["CAP_MKNOD", "net_raw"],
     ["CAP_NET_ADMIN", "CAP_SYS_TIME", "CAP_CHOWN"], ["CAP_MKNOD", "CAP_NET_RAW"]),
    (["ALL"], ["CHOWN"], ["CAP_SYS_ADMIN", "CAP_KILL"], ["CAP_CHOWN"]),
    (["NET_BIND_SERVICE"], ["ALL"], ["CAP_NET_BIND_SERVICE"], ["CAP_CHOWN", "CAP_KILL"]),
    ([], ["all"], [], ["CAP_CHOWN"]),
])
def test_capability_add_and_drop(add, drop, present, absent):
    config = container_config(linux=security_context(capabilities=cri.Capability(add_capabilities=add,
                                                                                 drop_capabilities=drop)))
    caps = build(spec_input(config=config))["process"]["capabilities"]
    for name in present:
        assert name in caps["bounding"] and name in caps["effective"] and name in caps["permitted"]
    for name in absent:
        assert name not in caps["bounding"]
    assert len(caps["bounding"]) == len(set(caps["bounding"]))


def test_drop_all_then_add_gives_exactly_the_added():
    config = container_config(linux=security_context(capabilities=cri.Capability(
        add_capabilities=["NET_BIND_SERVICE"], drop_capabilities=["ALL"])))
    assert build(spec_input(config=config))["process"]["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]


def test_ambient_capabilities_are_also_inheritable_and_permitted():
    config = container_config(linux=security_context(capabilities=cri.Capability(
        drop_capabilities=["ALL"], add_ambient_capabilities=["NET_BIND_SERVICE"])))
    caps = build(spec_input(config=config))["process"]["capabilities"]
    assert caps["ambient"] == caps["inheritable"] == caps["permitted"] == ["CAP_NET_BIND_SERVICE"]


def test_unknown_capability_is_rejected():
    config = container_config(linux=security_context(capabilities=cri.Capability(add_capabilities=["FLY"])))
    with pytest.raises(SpecInputError, match="unknown capability 'FLY'"):
        build_container_spec(spec_input(config=config))


def seccomp_config(profile_type=None, localhost_ref="", path="", **kwargs) -> cri.ContainerConfig:
    extra = dict(kwargs)
    if profile_type is not None:
        extra["seccomp"] = cri.SecurityProfile(profile_type=profile_type, localhost_ref=localhost_ref)
    if path:
        extra["seccomp_profile_path"] = path
    return container_config(linux=security_context(**extra))


BLOCK_CHMOD = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}


def test_runtime_default_seccomp_is_the_default_profile_for_the_containers_capabilities():
    seccomp = build(spec_input(config=seccomp_config(cri.SecurityProfile.RuntimeDefault)))["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == 1
    allowed = {n for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
               for n in rule["names"]}
    assert {"read", "write", "execve", "chroot"} <= allowed  # chroot: the default set has CAP_SYS_CHROOT
    assert not {"unshare", "mount", "setns", "reboot", "keyctl"} & allowed
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in seccomp["syscalls"]

    with_admin = build(spec_input(config=seccomp_config(
        cri.SecurityProfile.RuntimeDefault, capabilities=cri.Capability(add_capabilities=["SYS_ADMIN"]),
    )))["linux"]["seccomp"]
    admin_allowed = {n for rule in with_admin["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]}
    assert {"unshare", "mount", "setns", "clone3"} <= admin_allowed
    assert not [r for r in with_admin["syscalls"] if r["action"] == "SCMP_ACT_ERRNO"]

    no_caps = build(spec_input(config=seccomp_config(
        cri.SecurityProfile.RuntimeDefault, capabilities=cri.Capability(drop_capabilities=["ALL"]),
    )))["linux"]["seccomp"]
    assert "chroot" not in {n for rule in no_caps["syscalls"] for n in rule["names"]}


def test_unconfined_and_privileged_containers_get_no_seccomp_filter(tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    assert "seccomp" not in build(spec_input(config=seccomp_config(cri.SecurityProfile.Unconfined)))["linux"]
    for privileged in (seccomp_config(cri.SecurityProfile.RuntimeDefault, privileged=True),
                       seccomp_config(cri.SecurityProfile.Localhost, str(profile), privileged=True),
                       seccomp_config(path="runtime/default", privileged=True)):
        assert "seccomp" not in build(spec_input(config=privileged))["linux"]


def test_localhost_seccomp_profile_is_read_from_the_node(tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    for ref in (str(profile), f"localhost/{profile}"):
        seccomp = build(spec_input(config=seccomp_config(cri.SecurityProfile.Localhost, ref)))["linux"]["seccomp"]
        assert seccomp == {"defaultAction": "SCMP_ACT_ALLOW",
                           "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ('{"defaultAction": "SCMP_ACT_SOMETIMES"}', "unknown action 'SCMP_ACT_SOMETIMES'"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "sycalls": []}', "unknown key(s) 'sycalls'"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_missing_or_invalid_localhost_profile_is_refused_with_its_path(tmp_path, content, words):
    profile = tmp_path / "profile.json"
    if content is not None:
        profile.write_text(content)
    with pytest.raises(SpecInputError) as err:
        build_container_spec(spec_input(config=seccomp_config(cri.SecurityProfile.Localhost, str(profile))))
    assert str(profile) in str(err.value) and words in str(err.value)


def test_localhost_profile_that_is_not_a_small_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening it must not block CreateContainer
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20) + "{}")
    for path, words in ((tmp_path, "not a regular file"), (fifo, "not a regular file"), (big, "more than")):
        with pytest.raises(SpecInputError, match=words):
            build_container_spec(spec_input(config=seccomp_config(cri.SecurityProfile.Localhost, str(path))))


def test_check_seccomp_profile_reads_a_localhost_profile_without_building_the_spec(tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    rs.check_seccomp_profile(seccomp_config(cri.SecurityProfile.Localhost, str(profile)).linux.security_context)
    missing = seccomp_config(cri.SecurityProfile.Localhost, str(tmp_path / "missing.json")).linux.security_context
    with pytest.raises(SpecInputError, match="missing.json: no such file"):
        rs.check_seccomp_profile(missing)
    privileged = seccomp_config(cri.SecurityProfile.Localhost, str(tmp_path / "missing.json"), privileged=True)
    rs.check_seccomp_profile(privileged.linux.security_context)  # ignored: a privileged container is unconfined


@pytest.mark.parametrize("ref, words", [("", "path is empty"), ("profiles/audit.json", "must be an absolute path"),
                                        ("localhost/", "path is empty")])
def test_localhost_seccomp_needs_an_absolute_path_before_anything_is_done(ref, words):
    with pytest.raises(SpecInputError, match=words):
        rs.validate_container_config(seccomp_config(cri.SecurityProfile.Localhost, ref))


def test_deprecated_seccomp_profile_path_is_honoured_when_the_field_is_unset(tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    for path in ("runtime/default", "docker/default"):
        seccomp = build(spec_input(config=seccomp_config(path=path)))["linux"]["seccomp"]
        assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "seccomp" not in build(spec_input(config=seccomp_config(path="unconfined")))["linux"]
    local = build(spec_input(config=seccomp_config(path=f"localhost/{profile}")))["linux"]["seccomp"]
    assert local["defaultAction"] == "SCMP_ACT_ALLOW"
    # the seccomp field wins over the deprecated one
    both = seccomp_config(cri.SecurityProfile.Unconfined, path="runtime/default")
    assert "seccomp" not in build(spec_input(config=both))["linux"]
    with pytest.raises(SpecInputError, match="seccomp_profile_path 'apparmor/x' is unknown"):
        rs.validate_container_config(seccomp_config(path="apparmor/x"))


# --- mounts ---------------------------------------------------------------

def test_mounts_with_propagation(tmp_path):
    data, logs, shared = (tmp_path / "data", tmp_path / "logs", tmp_path / "shared")
    for d in (data, logs, shared):
        d.mkdir()
    config = container_config(mounts=[
        cri.Mount(container_path="/data/", host_path=str(data), readonly=True),
        cri.Mount(container_path="/var/log", host_path=str(logs), propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
        cri.Mount(container_path="/mnt/shared", host_path=str(shared), propagation=cri.PROPAGATION_BIDIRECTIONAL),
    ])
    spec = build(spec_input(config=config))
    assert mount_at(spec, "/data") == {"destination": "/data", "type": "bind", "source": str(data),
                                       "options": ["rbind", "rprivate", "ro"]}
    assert mount_at(spec, "/var/log")["options"] == ["rbind", "rslave", "rw"]
    assert mount_at(spec, "/mnt/shared")["options"] == ["rbind", "rshared", "rw"]
    assert spec["linux"]["rootfsPropagation"] == "shared"


def test_no_rootfs_propagation_without_bidirectional_mounts(tmp_path):
    config = container_config(mounts=[cri.Mount(container_path="/x", host_path=str(tmp_path),
                                                 propagation=cri.PROPAGATION_HOST_TO_CONTAINER)])
    assert "rootfsPropagation" not in build(spec_input(config=config))["linux"]


def test_request_mount_replaces_sandbox_file_and_default_mount(tmp_path):
    pod_hosts, my_hosts, shm = tmp_path / "pod-hosts", tmp_path / "my-hosts", tmp_path / "shm"
    pod_hosts.write_text("")
    my_hosts.write_text("")
    shm.mkdir()
    config = container_config(mounts=[
        cri.Mount(container_path="/etc/hosts", host_path=str(my_hosts)),
        cri.Mount(container_path="/dev/shm", host_path=str(shm)),
    ])
    spec = build(spec_input(config=config, sandbox_files={"/etc/hosts": str(pod_hosts)}))
    assert mount_at(spec, "/etc/hosts")["source"] == str(my_hosts)
    assert mount_at(spec, "/dev/shm")["source"] == str(shm)


def test_parents_are_mounted_before_children(tmp_path):
    config = container_config(mounts=[
        cri.Mount(container_path="/a/b/c", host_path=str(tmp_path)),
        cri.Mount(container_path="/a", host_path=str(tmp_path)),
    ])
    destinations = [m["destination"] for m in build(spec_input(config=config))["mounts"]]
    assert destinations.index("/a") < destinations.index("/a/b/c")
    assert destinations.index("/dev") < destinations.index("/dev/shm")


@pytest.mark.parametrize("mount, words", [
    (cri.Mount(container_path="data", host_path="/tmp"), "container_path 'data' must be absolute"),
    (cri.Mount(container_path="", host_path="/tmp"), "container_path is empty"),
    (cri.Mount(container_path="/data", host_path=""), "host_path is empty"),
    (cri.Mount(container_path="/data", host_path="/tmp", recursive_read_only=True),
     "recursive_read_only needs readonly"),
    (cri.Mount(container_path="/data", host_path="/tmp", readonly=True, recursive_read_only=True,
               propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
     "recursive_read_only needs private propagation, not PROPAGATION_HOST_TO_CONTAINER"),
    (cri.Mount(container_path="/data", host_path="/tmp", readonly=True, recursive_read_only=True,
               propagation=cri.PROPAGATION_BIDIRECTIONAL), "not PROPAGATION_BIDIRECTIONAL"),
    (cri.Mount(container_path="/data", host_path="/tmp", readonly=True, recursive_read_only=True),
     "need Linux 5.12 or later"),  # spec_input() says the host cannot
    (cri.Mount(container_path="/data", host_path="/no/such/dir/for/pyshim"), "does not exist"),
])
def test_bad_mounts_are_input_errors(mount, words):
    with pytest.raises(SpecInputError, match=words):
        build_container_spec(spec_input(config=container_config(mounts=[mount])))


# --- devices --------------------------------------------------------------

def test_device_nodes_come_from_the_host():
    config = container_config(devices=[cri.Device(container_path="/dev/mynull", host_path="/dev/null",
                                                   permissions="rw")])
    spec = build(spec_input(config=config))
    st = os.stat("/dev/null")
    assert spec["linux"]["devices"] == [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3,
                                         "fileMode": st.st_mode & 0o777, "uid": st.st_uid, "gid": st.st_gid}]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}]


@pytest.mark.parametrize("device, words", [
    (cri.Device(container_path="/dev/x", host_path="/etc/hostname"), "not a character or block device"),
    (cri.Device(container_path="/dev/x", host_path="/dev/no-such-device"), "No such file"),
    (cri.Device(container_path="dev/x", host_path="/dev/null"), "must be absolute"),
    (cri.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx"), "only contain r, w and m"),
])
def test_bad_devices_are_input_errors(device, words):
    with pytest.raises(SpecInputError, match=words):
        build_container_spec(spec_input(config=container_config(devices=[device])))


# --- namespaces -----------------------------------------------------------

def test_namespaces_are_passed_through_in_a_fixed_order():
    spec = build(spec_input(namespaces={"mount": None, "pid": "/proc/77/ns/pid", "network": "/var/run/netns/p",
                                        "ipc": None}))
    assert spec["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/77/ns/pid"}, {"type": "network", "path": "/var/run/netns/p"},
        {"type": "ipc"}, {"type": "mount"}]
    assert "hostname" not in spec  # no UTS namespace: runc would refuse to set it


@pytest.mark.parametrize("pid_mode, expected", [
    (None, [{"type": "pid"}]),                                   # CONTAINER: a new one
    ("/proc/42/ns/pid", [{"type": "pid", "path": "/proc/42/ns/pid"}]),  # POD: join the sandbox's
    ("absent", []),                                              # NODE: the host's
])
def test_pid_namespace_modes_as_passed(pid_mode, expected):
    namespaces = {"mount": None}
    if pid_mode != "absent":
        namespaces["pid"] = pid_mode
    spec = build(spec_input(namespaces=namespaces))
    assert [n for n in spec["linux"]["namespaces"] if n["type"] == "pid"] == expected


@pytest.mark.parametrize("namespaces, words", [
    ({"pid": None}, "own mount namespace"),
    ({"mount": None, "time": None}, "unknown namespace"),
    ({"mount": None, "network": "netns/x"}, "must be absolute"),
])
def test_bad_namespaces_are_input_errors(namespaces, words):
    with pytest.raises(SpecInputError, match=words):
        build_container_spec(spec_input(namespaces=namespaces))


# --- resources ------------------------------------------------------------

def test_linux_resources_from_cri():
    resources = cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=256 << 20,
        memory_swap_limit_in_bytes=512 << 20, cpuset_cpus="0-1", cpuset_mems="0", oom_score_adj=-5,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 20)])
    assert rs.linux_resources_from_cri(resources) == {
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 256 << 20, "swap": 512 << 20},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
    }


def test_empty_resources_set_nothing():
    assert rs.linux_resources_from_cri(cri.LinuxContainerResources()) == {}
    assert rs.linux_resources_from_cri(None) == {}


def test_resources_land_in_the_spec():
    config = container_config(linux=cri.LinuxContainerConfig(
        resources=cri.LinuxContainerResources(cpu_shares=2, memory_limit_in_bytes=1 << 30)))
    resources = build(spec_input(config=config))["linux"]["resources"]
    assert resources["cpu"] == {"shares": 2}
    assert resources["memory"] == {"limit": 1 << 30}


# --- request checks -------------------------------------------------------

@pytest.mark.parametrize("config, words", [
    (cri.ContainerConfig(), "metadata.name is required"),
    (container_config(metadata=cri.ContainerMetadata(name="")), "metadata.name is required"),
    (container_config(envs=[cri.KeyValue(key="", value="x")]), "invalid name"),
    (container_config(envs=[cri.KeyValue(key="A=B", value="x")]), "invalid name"),
    (container_config(linux=security_context(run_as_user=cri.Int64Value(value=-1))), "negative"),
])
def test_validate_container_config_rejects(config, words):
    with pytest.raises(SpecInputError, match=words):
        rs.validate_container_config(config)


def test_enum_mirrors_match_the_generated_cri_module():
    assert rs.PROPAGATION_PRIVATE == cri.PROPAGATION_PRIVATE
    assert rs.PROPAGATION_HOST_TO_CONTAINER == cri.PROPAGATION_HOST_TO_CONTAINER
    assert rs.PROPAGATION_BIDIRECTIONAL == cri.PROPAGATION_BIDIRECTIONAL
    assert rs.SECCOMP_RUNTIME_DEFAULT == cri.SecurityProfile.RuntimeDefault
    assert rs.SECCOMP_UNCONFINED == cri.SecurityProfile.Unconfined
    assert rs.SECCOMP_LOCALHOST == cri.SecurityProfile.Localhost
    assert rs.SUPPLEMENTAL_GROUPS_STRICT == cri.Strict


def test_spec_modules_do_not_import_pyshim():
    import ast
    for module in (rs, __import__("oci.spec_schema", fromlist=["x"])):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and m.split(".")[0] == "pyshim"], module.__name__


# --- the real runc --------------------------------------------------------

RUNC = shutil.which("runc")
BUSYBOX = "/bin/busybox"
TEST_CGROUP_PARENT = "pyshim-spec-test"


needs_runc = pytest.mark.skipif(os.geteuid() != 0 or RUNC is None or not os.path.exists(BUSYBOX),
                                reason="needs root, runc and a static /bin/busybox")


def runc_run(bundle: Path, spec: dict, container_id: str) -> subprocess.CompletedProcess:
    """`runc run` the spec in its own state root; always leaves nothing behind."""
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    runc = [RUNC, "--root", str(bundle.parent / "runc-state")]
    try:
        return subprocess.run([*runc, "run", "--bundle", str(bundle), container_id],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([*runc, "delete", "--force", container_id], capture_output=True, timeout=30)
        # runc removes the container's cgroups, not the parent the test made up
        for parent in Path("/sys/fs/cgroup").glob(f"*/{TEST_CGROUP_PARENT}"):
            try:
                parent.rmdir()
            except OSError:
                pass


def busybox_rootfs(tmp_path: Path) -> Path:
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "etc").mkdir()
    return rootfs


@needs_runc
def test_runc_runs_a_built_spec(tmp_path):
    rootfs = busybox_rootfs(tmp_path)
    (rootfs / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\nworker:x:1234:1234::/:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\nworker:x:1234:\n")
    pod_hostname = tmp_path / "hostname"
    pod_hostname.write_text("pod-host\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "greeting").write_text("hello from the host\n")

    container_id = f"pyshim-spec-test-{uuid.uuid4().hex[:8]}"
    config = container_config(
        command=["/bin/busybox", "sh", "-c"],
        args=["echo user=$(/bin/busybox id -u):$(/bin/busybox id -g) env=$GREETING; "
              "/bin/busybox cat /etc/hostname /data/greeting; "
              "echo > /data/greeting 2>/dev/null || echo data-is-readonly"],
        envs=[cri.KeyValue(key="GREETING", value="hi")],
        mounts=[cri.Mount(container_path="/data", host_path=str(data), readonly=True)],
        linux=security_context(no_new_privs=True),
    )
    inp = spec_input(
        config=config, rootfs=str(rootfs), image=ImageConfig(user="worker"),
        namespaces={"pid": None, "network": None, "ipc": None, "uts": None, "mount": None},
        sandbox_files={"/etc/hostname": str(pod_hostname)},
        cgroups_path=f"/{TEST_CGROUP_PARENT}/{container_id}")
    result = runc_run(tmp_path / "bundle", build(inp), container_id)
    assert result.returncode == 0, f"runc rejected the spec: {result.stderr}\n{result.stdout}"
    assert result.stdout.splitlines() == [
        "user=1234:1234 env=hi", "pod-host", "hello from the host", "data-is-readonly"]


@needs_runc
def test_runc_runs_a_privileged_spec_with_a_bidirectional_mount(tmp_path):
    rootfs = busybox_rootfs(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    container_id = f"pyshim-spec-test-{uuid.uuid4().hex[:8]}"
    config = container_config(
        command=["/bin/busybox", "sh", "-c",
                 "/bin/busybox grep CapEff /proc/self/status; /bin/busybox test -c /dev/null && echo has-null; "
                 "/bin/busybox mount | /bin/busybox grep ' /sys '"],
        mounts=[cri.Mount(container_path="/shared", host_path=str(shared), propagation=cri.PROPAGATION_BIDIRECTIONAL)],
        linux=security_context(privileged=True))
    inp = spec_input(config=config, rootfs=str(rootfs), image=ImageConfig(),
                     namespaces={"pid": None, "network": None, "ipc": None, "uts": None, "mount": None},
                     cgroups_path=f"/{TEST_CGROUP_PARENT}/{container_id}")
    result = runc_run(tmp_path / "bundle", build(inp), container_id)
    assert result.returncode == 0, f"runc rejected the spec: {result.stderr}\n{result.stdout}"
    with open("/proc/self/status") as f:
        host_bounding = next(line for line in f if line.startswith("CapBnd:")).split()[1]
    lines = result.stdout.splitlines()
    assert lines[0].split()[1] == host_bounding  # every capability the host can grant
    assert lines[1] == "has-null"
    assert "(rw," in lines[2]


@needs_runc
@pytest.mark.parametrize("profile_type, status, unshare", [
    (cri.SecurityProfile.RuntimeDefault, "2", "unshare: unshare(0x10000000): Operation not permitted"),
    (cri.SecurityProfile.Unconfined, "0", "userns-made"),
])
def test_runc_enforces_the_runtime_default_profile(tmp_path, profile_type, status, unshare):
    # A user namespace needs no capability, so only the profile stops unshare(CLONE_NEWUSER) here.
    rootfs = busybox_rootfs(tmp_path)
    container_id = f"pyshim-spec-test-{uuid.uuid4().hex[:8]}"
    config = container_config(
        command=["/bin/busybox", "sh", "-c",
                 "/bin/busybox grep Seccomp: /proc/self/status; /bin/busybox unshare -U /bin/busybox true 2>&1 "
                 "&& echo userns-made; exit 0"],
        linux=security_context(seccomp=cri.SecurityProfile(profile_type=profile_type)))
    inp = spec_input(config=config, rootfs=str(rootfs), image=ImageConfig(),
                     namespaces={"pid": None, "network": None, "ipc": None, "uts": None, "mount": None},
                     cgroups_path=f"/{TEST_CGROUP_PARENT}/{container_id}")
    result = runc_run(tmp_path / "bundle", build(inp), container_id)
    assert result.returncode == 0, f"runc rejected the spec: {result.stderr}\n{result.stdout}"
    assert result.stdout.splitlines() == [f"Seccomp:\t{status}", unshare]


@needs_runc
def test_runc_enforces_a_localhost_profile(tmp_path):
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps(BLOCK_CHMOD))
    rootfs = busybox_rootfs(tmp_path)
    container_id = f"pyshim-spec-test-{uuid.uuid4().hex[:8]}"
    config = container_config(
        command=["/bin/busybox", "sh", "-c", "/bin/busybox chmod 400 / 2>&1; /bin/busybox touch /tmp-file && "
                 "echo touched"],
        linux=security_context(seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost,
                                                           localhost_ref=str(profile))))
    inp = spec_input(config=config, rootfs=str(rootfs), image=ImageConfig(),
                     namespaces={"pid": None, "network": None, "ipc": None, "uts": None, "mount": None},
                     cgroups_path=f"/{TEST_CGROUP_PARENT}/{container_id}")
    result = runc_run(tmp_path / "bundle", build(inp), container_id)
    assert result.returncode == 0, f"runc rejected the spec: {result.stderr}\n{result.stdout}"
    assert result.stdout.splitlines() == ["chmod: /: Operation not permitted", "touched"]


def test_a_recursive_read_only_mount_gets_runcs_rro_option_where_the_host_supports_it(tmp_path):
    mount = cri.Mount(container_path="/data", host_path=str(tmp_path), readonly=True, recursive_read_only=True)
    inp = dataclasses.replace(spec_input(config=container_config(mounts=[mount])), recursive_read_only_supported=True)
    [data] = [m for m in build(inp)["mounts"] if m["destination"] == "/data"]
    assert data["options"] == ["rbind", "rprivate", "ro", "rro"]


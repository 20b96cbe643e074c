"""Build the OCI runtime config (config.json) of a container from a CRI CreateContainerRequest.

The output is a runtime-spec 1.0.2 document that runc 1.1.5 accepts. Defaults follow
containerd's CRI plugin (capabilities, masked/readonly paths, default mounts, the
`io.kubernetes.cri.*` annotations that checkpointctl reads) unless noted otherwise.

The CRI messages come from `cri_api.api_pb2` (package runtime.v1); this module only
reads their fields, so it never imports the generated code at run time.
"""
from __future__ import annotations

import enum
import os
import posixpath
import resource
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from oci.image_config import ImageConfig
from oci.seccomp import profile as seccomp

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cri_api import api_pb2 as cri

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# CRI-O's default; clamped to what this process may grant (see nofile_limit).
NOFILE_LIMIT = 1048576

# Enum values of runtime.v1 (api.proto); test_runtime_spec checks them against api_pb2.
PROPAGATION_PRIVATE = 0
PROPAGATION_HOST_TO_CONTAINER = 1
PROPAGATION_BIDIRECTIONAL = 2
SECCOMP_RUNTIME_DEFAULT = 0
SECCOMP_UNCONFINED = 1
SECCOMP_LOCALHOST = 2
# Values of the deprecated seccomp_profile_path, as containerd reads them.
SECCOMP_PATHS_RUNTIME_DEFAULT = ("runtime/default", "docker/default")
SECCOMP_PATH_UNCONFINED = "unconfined"
SECCOMP_LOCALHOST_PREFIX = "localhost/"
SUPPLEMENTAL_GROUPS_STRICT = 1

# Annotations containerd's CRI plugin puts on every container; checkpointctl and
# other tooling read them back from config.json.
ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_IMAGE_NAME = "io.kubernetes.cri.image-name"

# Linux capability numbers (linux/capability.h) up to CAP_CHECKPOINT_RESTORE, the
# last one runc 1.1.5 knows.
CAPABILITY_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
    "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

# containerd's defaultUnixCaps (pkg/oci/spec.go), the same set Docker uses.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

# containerd's populateDefaultUnixSpec (pkg/oci/spec.go).
DEFAULT_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

NAMESPACE_ORDER = ("pid", "network", "ipc", "uts", "mount", "cgroup")

# Entries of the host's /dev that are not devices to copy into a privileged
# container (containerd's HostDevices skips the same).
HOST_DEV_SKIP_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
HOST_DEV_SKIP_FILES = frozenset({"console"})

MAX_SYMLINK_HOPS = 40


class SpecInputError(ValueError):
    """The CRI request (or what it points at on disk) cannot be turned into a runtime config."""


@dataclass
class ContainerSpecInput:
    container_id: str
    rootfs: str                      # absolute path of the mounted overlay root
    config: "cri.ContainerConfig"
    sandbox_config: "cri.PodSandboxConfig"
    image_config: ImageConfig
    # keys among NAMESPACE_ORDER: a path to join, or None for a new private
    # namespace; an absent key shares the host's namespace.
    namespaces: dict[str, str | None]
    hostname: str
    sandbox_files: dict[str, str]    # container path -> host path, bind-mounted
    cgroups_path: str                # cgroupfs style, e.g. "/pyshim/<pod>/<ctr>"
    annotations: dict[str, str]      # extra annotations from the daemon
    sysctls: dict[str, str]          # already validated
    # Written to io.kubernetes.cri.sandbox-id; when empty, an
    # annotations[ANNOTATION_SANDBOX_ID] from the daemon is used instead.
    sandbox_id: str = ""
    # The host can make a bind mount read-only with all its submounts (Linux 5.12 mount_setattr and
    # a runc that knows the "rro" option): what Mount.recursive_read_only asks for.
    recursive_read_only_supported: bool = False


# ---------------------------------------------------------------------------
# Request sanity checks (no filesystem access)
# ---------------------------------------------------------------------------

# What execve(2) takes (linux/binfmts.h): one argument or environment string of at most
# MAX_ARG_STRLEN bytes with its NUL, and all of them with their pointers within ARG_MAX.
MAX_ARG_STRLEN = 32 * 4096
POINTER_BYTES = 8
# Far beyond any real pod (each Service adds 7 variables), far below what makes runc crawl:
# 100k variables took runc 21 s to refuse at start.
MAX_EXEC_STRINGS = 32768


def validate_container_config(config: "cri.ContainerConfig", image: "ImageConfig | None" = None,
                              hostname: str = "") -> None:
    """Reject requests that can never produce a runnable container, before any work is done.

    With the `image`'s config, the process it would run (the image's Env and Entrypoint/Cmd with
    the request's) is checked against what the kernel can exec; without, the request's own part."""
    if not config.HasField("metadata") or not config.metadata.name:
        raise SpecInputError("container config: metadata.name is required")
    name = config.metadata.name
    if image is None:
        check_exec_size(name, [*config.command, *config.args], [f"{e.key}={e.value}" for e in config.envs])
    else:
        check_exec_size(name, process_args(config, image), process_env(config, image, hostname))
    if config.working_dir and not config.working_dir.startswith("/"):
        raise SpecInputError(f"container {name!r}: working_dir {config.working_dir!r} must be an absolute path")
    for i, env in enumerate(config.envs):
        if not env.key or "=" in env.key:
            raise SpecInputError(f"container {name!r}: envs[{i}] has an invalid name {env.key!r}")
    for i, mount in enumerate(config.mounts):
        check_cri_mount(name, i, mount)
    for i, device in enumerate(config.devices):
        check_cri_device(name, i, device)
    check_security_context(name, config.linux.security_context)


def check_exec_size(container: str, argv: list[str], env: list[str]) -> None:
    """Refuse a process the kernel would refuse to exec (E2BIG), or that is absurdly large."""
    count = len(argv) + len(env)
    if count > MAX_EXEC_STRINGS:
        raise SpecInputError(f"container {container!r}: {len(argv)} arguments and {len(env)} environment "
                             f"variables exceed the limit of {MAX_EXEC_STRINGS} in all")
    total = (count + 2) * POINTER_BYTES
    for what, strings in (("argument", argv), ("environment variable", env)):
        for i, text in enumerate(strings):
            size = len(text.encode(errors="surrogateescape")) + 1
            if size > MAX_ARG_STRLEN:
                raise SpecInputError(f"container {container!r}: {what} {i} ({text[:40]!r}...) is {size} bytes; "
                                     f"the kernel execs none longer than {MAX_ARG_STRLEN} (MAX_ARG_STRLEN)")
            total += size
    arg_max = os.sysconf("SC_ARG_MAX")
    if total > arg_max:
        raise SpecInputError(f"container {container!r}: arguments and environment take {total} bytes; the kernel "
                             f"execs at most {arg_max} (ARG_MAX, with their pointers)")


def check_cri_mount(container: str, index: int, mount: "cri.Mount") -> None:
    where = f"container {container!r}: mounts[{index}]"
    if mount.HasField("image") and mount.image.image:
        raise SpecInputError(f"{where}: image volume mounts are not supported")
    if not mount.container_path:
        raise SpecInputError(f"{where}: container_path is empty")
    if not mount.container_path.startswith("/"):
        raise SpecInputError(f"{where}: container_path {mount.container_path!r} must be absolute")
    if not mount.host_path:
        raise SpecInputError(f"{where} ({mount.container_path}): host_path is empty")
    if mount.recursive_read_only and not mount.readonly:
        raise SpecInputError(f"{where} ({mount.container_path}): recursive_read_only needs readonly as well")
    if mount.recursive_read_only and mount.propagation != PROPAGATION_PRIVATE:
        # A submount propagated in later would arrive writable: the promise could not be kept.
        raise SpecInputError(f"{where} ({mount.container_path}): recursive_read_only needs private propagation, "
                             f"not {PROPAGATION_NAME.get(mount.propagation, mount.propagation)}")
    if len(mount.uidMappings) or len(mount.gidMappings):
        raise SpecInputError(f"{where} ({mount.container_path}): id-mapped mounts are not supported")
    if mount.propagation not in PROPAGATION_OPTION:
        raise SpecInputError(f"{where} ({mount.container_path}): unknown propagation {mount.propagation}")


def check_cri_device(container: str, index: int, device: "cri.Device") -> None:
    where = f"container {container!r}: devices[{index}]"
    if not device.container_path.startswith("/"):
        raise SpecInputError(f"{where}: container_path {device.container_path!r} must be absolute")
    if not device.host_path.startswith("/"):
        raise SpecInputError(f"{where}: host_path {device.host_path!r} must be absolute")
    if set(device.permissions) - set("rwm"):
        raise SpecInputError(f"{where}: permissions {device.permissions!r} may only contain r, w and m")


def check_security_context(container: str, sc: "cri.LinuxContainerSecurityContext") -> None:
    where = f"container {container!r}: security_context"
    if sc.HasField("run_as_user") and sc.run_as_user.value < 0:
        raise SpecInputError(f"{where}: run_as_user {sc.run_as_user.value} is negative")
    if sc.HasField("run_as_group"):
        if sc.run_as_group.value < 0:
            raise SpecInputError(f"{where}: run_as_group {sc.run_as_group.value} is negative")
        if not sc.HasField("run_as_user") and not sc.run_as_username:
            # same rule as containerd: a group alone would silently pair with the image's user
            raise SpecInputError(f"{where}: run_as_group is set without run_as_user or run_as_username")
    for gid in sc.supplemental_groups:
        if gid < 0:
            raise SpecInputError(f"{where}: supplemental group {gid} is negative")
    for cap in [*sc.capabilities.add_capabilities, *sc.capabilities.drop_capabilities,
                *sc.capabilities.add_ambient_capabilities]:
        if cap.strip().upper() != "ALL" and capability_name(cap) not in CAPABILITY_BITS:
            raise SpecInputError(f"{where}: unknown capability {cap!r}")
    requested_seccomp(sc, where)


# ---------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------

def build_container_spec(inp: ContainerSpecInput) -> dict:
    """The runtime-spec config.json of one container, as a JSON-ready dict."""
    config = inp.config
    validate_container_config(config, inp.image_config, inp.hostname)
    if not inp.rootfs.startswith("/"):
        raise SpecInputError(f"rootfs {inp.rootfs!r} must be an absolute path")
    check_namespaces(inp.namespaces)

    sc = config.linux.security_context
    privileged = sc.privileged
    resources = linux_resources_from_cri(config.linux.resources)
    devices, device_rules = container_devices(config.devices, privileged)
    resources["devices"] = device_rules

    process: dict = {
        "terminal": config.tty,
        "user": process_user(inp.rootfs, sc, inp.image_config.user),
        "args": process_args(config, inp.image_config),
        "env": process_env(config, inp.image_config, inp.hostname),
        "cwd": working_dir(config, inp.image_config),
        "capabilities": process_capabilities(sc),
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_limit(), "soft": nofile_limit()}],
        "noNewPrivileges": sc.no_new_privs,
    }
    if config.linux.resources.oom_score_adj:
        process["oomScoreAdj"] = config.linux.resources.oom_score_adj

    mounts = container_mounts(inp, privileged, sc.readonly_rootfs)
    linux: dict = {
        "namespaces": oci_namespaces(inp.namespaces),
        "cgroupsPath": inp.cgroups_path,
        "resources": resources,
        "devices": devices,
        "maskedPaths": masked_paths(sc),
        "readonlyPaths": readonly_paths(sc),
    }
    if inp.sysctls:
        linux["sysctl"] = dict(inp.sysctls)
    propagation = rootfs_propagation(config.mounts)
    if propagation:
        linux["rootfsPropagation"] = propagation
    seccomp = seccomp_profile(sc, process["capabilities"]["bounding"])
    if seccomp is not None:
        linux["seccomp"] = seccomp

    spec: dict = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": inp.rootfs, "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": container_annotations(inp),
        "linux": linux,
    }
    # runc refuses to set a hostname unless the container has (or joins) a UTS namespace.
    if "uts" in inp.namespaces and inp.hostname:
        spec["hostname"] = inp.hostname
    return spec


def check_namespaces(namespaces: dict[str, str | None]) -> None:
    unknown = set(namespaces) - set(NAMESPACE_ORDER)
    if unknown:
        raise SpecInputError(f"unknown namespace type(s) {sorted(unknown)}; known: {list(NAMESPACE_ORDER)}")
    if "mount" not in namespaces:
        raise SpecInputError("a container needs its own mount namespace; runc cannot pivot into the rootfs without one")
    for kind, path in namespaces.items():
        if path is not None and not path.startswith("/"):
            raise SpecInputError(f"{kind} namespace path {path!r} must be absolute")


def oci_namespaces(namespaces: dict[str, str | None]) -> list[dict]:
    out = []
    for kind in NAMESPACE_ORDER:
        if kind not in namespaces:
            continue
        path = namespaces[kind]
        out.append({"type": kind} if path is None else {"type": kind, "path": path})
    return out


# --- process ---------------------------------------------------------------

def process_args(config: "cri.ContainerConfig", image: ImageConfig) -> list[str]:
    """Kubernetes semantics: command replaces the image Entrypoint *and* drops its Cmd;
    args replace the image Cmd."""
    command, args = list(config.command), list(config.args)
    if command:
        argv = command + args
    elif args:
        argv = list(image.entrypoint) + args
    else:
        argv = list(image.entrypoint) + list(image.cmd)
    if not argv:
        raise SpecInputError(
            f"container {config.metadata.name!r}: no command to run (no command/args in the request "
            "and no Entrypoint/Cmd in the image)")
    return argv


def process_env(config: "cri.ContainerConfig", image: ImageConfig, hostname: str) -> list[str]:
    """HOSTNAME, then the image's Env, then the request's envs; later ones win by name
    but keep the position of the first."""
    merged: dict[str, str] = {}
    if hostname:
        merged["HOSTNAME"] = f"HOSTNAME={hostname}"
    for entry in image.env:
        name = entry.split("=", 1)[0]
        if name:
            merged[name] = entry
    for kv in config.envs:
        merged[kv.key] = f"{kv.key}={kv.value}"
    if "PATH" not in merged:
        merged = {"PATH": DEFAULT_PATH_ENV, **merged}
    return list(merged.values())


def working_dir(config: "cri.ContainerConfig", image: ImageConfig) -> str:
    cwd = config.working_dir or image.working_dir or "/"
    if not cwd.startswith("/"):
        raise SpecInputError(f"image WorkingDir {cwd!r} must be an absolute path")
    return cwd


def nofile_limit() -> int:
    # Raising a hard rlimit above the current one needs CAP_SYS_RESOURCE, which
    # runc (our child) may not have; asking for more than we hold makes runc fail.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)


# --- user ------------------------------------------------------------------

@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...] = field(default_factory=tuple)


def process_user(rootfs: str, sc: "cri.LinuxContainerSecurityContext", image_user: str) -> dict:
    """process.user from the security context, else from the image's User, resolved
    against the container's own /etc/passwd and /etc/group."""
    passwd = read_passwd(rootfs)
    if sc.HasField("run_as_user"):
        uid = sc.run_as_user.value
        entry = find_passwd(passwd, uid=uid)
        gid = entry.gid if entry else 0
    elif sc.run_as_username:
        entry = find_passwd(passwd, name=sc.run_as_username)
        if entry is None:
            raise SpecInputError(f"run_as_username {sc.run_as_username!r} is not in the image's /etc/passwd")
        uid, gid = entry.uid, entry.gid
    else:
        uid, gid = parse_image_user(rootfs, passwd, image_user)
        entry = find_passwd(passwd, uid=uid)
    if sc.HasField("run_as_group"):
        gid = sc.run_as_group.value

    extra: list[int] = []
    if entry is not None and sc.supplemental_groups_policy != SUPPLEMENTAL_GROUPS_STRICT:
        extra += [g.gid for g in read_group(rootfs) if entry.name in g.members]
    extra += list(sc.supplemental_groups)
    user: dict = {"uid": uid, "gid": gid}
    additional = unique([g for g in extra if g != gid])
    if additional:
        user["additionalGids"] = additional
    return user


def parse_image_user(rootfs: str, passwd: list[PasswdEntry], spec: str) -> tuple[int, int]:
    """The image config's User: "", "uid", "name", "uid:gid", "name:group" and mixes."""
    if not spec:
        return 0, 0
    user_part, _, group_part = spec.partition(":")
    if user_part.isdigit():
        uid = int(user_part)
        entry = find_passwd(passwd, uid=uid)
        gid = entry.gid if entry else 0  # an unknown numeric uid is allowed, like docker/containerd
    else:
        entry = find_passwd(passwd, name=user_part)
        if entry is None:
            raise SpecInputError(f"image user {spec!r}: no user {user_part!r} in the image's /etc/passwd")
        uid, gid = entry.uid, entry.gid
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            group = next((g for g in read_group(rootfs) if g.name == group_part), None)
            if group is None:
                raise SpecInputError(f"image user {spec!r}: no group {group_part!r} in the image's /etc/group")
            gid = group.gid
    return uid, gid


def find_passwd(passwd: list[PasswdEntry], *, uid: int | None = None, name: str | None = None) -> PasswdEntry | None:
    for entry in passwd:
        if (uid is not None and entry.uid == uid) or (name is not None and entry.name == name):
            return entry
    return None


def read_passwd(rootfs: str) -> list[PasswdEntry]:
    entries = []
    for fields in colon_records(read_rootfs_file(rootfs, "/etc/passwd"), min_fields=4):
        if fields[2].isdigit() and fields[3].isdigit():
            entries.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
    return entries


def read_group(rootfs: str) -> list[GroupEntry]:
    entries = []
    for fields in colon_records(read_rootfs_file(rootfs, "/etc/group"), min_fields=3):
        if fields[2].isdigit():
            members = tuple(m for m in (fields[3].split(",") if len(fields) > 3 else []) if m)
            entries.append(GroupEntry(fields[0], int(fields[2]), members))
    return entries


def colon_records(text: str | None, min_fields: int) -> Iterable[list[str]]:
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) >= min_fields:
            yield fields


def read_rootfs_file(rootfs: str, path: str) -> str | None:
    """A file of the container image, or None if it has none."""
    host_path = resolve_in_rootfs(rootfs, path)
    try:
        with open(host_path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def resolve_in_rootfs(rootfs: str, path: str) -> str:
    """Host path of `path` as the container would see it.

    Symlinks are followed with the rootfs as "/", so an image whose /etc/passwd
    points at an absolute path (or climbs with "..") cannot make us read a host file.
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(rootfs, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise SpecInputError(f"too many symlinks resolving {path!r} in {rootfs}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        resolved.append(part)
    return os.path.join(rootfs, *resolved)


def unique(values: Iterable) -> list:
    """Drop repeats, keeping the first occurrence's position."""
    return list(dict.fromkeys(values))


# --- capabilities ----------------------------------------------------------

def capability_name(raw: str) -> str:
    """"net_admin", "NET_ADMIN" and "CAP_NET_ADMIN" all name CAP_NET_ADMIN."""
    name = raw.strip().upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


def host_capabilities() -> list[str]:
    """Capabilities in this process's bounding set: what "ALL" can really grant here.

    runc cannot give a container a capability it does not hold itself (here,
    for instance, CAP_SYS_RESOURCE is missing), so "all" means all we have, as in
    containerd (cap.Current()).
    """
    bits = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    bits = int(line.split()[1], 16)
    except OSError:
        pass
    if bits is None:
        return list(CAPABILITY_BITS)
    return [name for name, bit in CAPABILITY_BITS.items() if bits & (1 << bit)]


def container_capabilities(sc: "cri.LinuxContainerSecurityContext") -> list[str]:
    """containerd's order: "ALL" in add, then "ALL" in drop, then the single adds and drops,
    so add=[ALL] drop=[CHOWN] is everything but CHOWN and drop=[ALL] add=[KILL] is just KILL."""
    if sc.privileged:
        return host_capabilities()
    adds = [c for c in sc.capabilities.add_capabilities if c.strip().upper() != "ALL"]
    drops = [c for c in sc.capabilities.drop_capabilities if c.strip().upper() != "ALL"]
    caps = list(DEFAULT_CAPABILITIES)
    if len(adds) != len(sc.capabilities.add_capabilities):
        caps = host_capabilities()
    if len(drops) != len(sc.capabilities.drop_capabilities):
        caps = []
    caps += [capability_name(c) for c in adds]
    dropped = {capability_name(c) for c in drops}
    return unique(c for c in caps if c not in dropped)


def process_capabilities(sc: "cri.LinuxContainerSecurityContext") -> dict:
    caps = container_capabilities(sc)
    ambient = unique(capability_name(c) for c in sc.capabilities.add_ambient_capabilities)
    # An ambient capability must also be permitted and inheritable.
    caps = unique(caps + ambient)
    out = {"bounding": caps, "effective": caps, "permitted": caps}
    if ambient:
        out["inheritable"] = ambient
        out["ambient"] = ambient
    return out


# --- security profiles -----------------------------------------------------

class SeccompKind(enum.Enum):
    UNCONFINED = "unconfined"
    RUNTIME_DEFAULT = "runtime/default"
    LOCALHOST = "localhost"


@dataclass(frozen=True)
class SeccompRequest:
    """The seccomp profile a request asks for (before `privileged` overrides it)."""
    kind: SeccompKind
    localhost_path: str = ""  # LOCALHOST: absolute path of the profile file on the node


def requested_seccomp(sc: "cri.LinuxContainerSecurityContext", where: str = "security_context") -> SeccompRequest:
    """The `seccomp` field, else the deprecated `seccomp_profile_path`, else unconfined: containerd's
    reading (a request naming neither runs unconfined, as there)."""
    if sc.HasField("seccomp"):
        profile = sc.seccomp
        if profile.profile_type == SECCOMP_RUNTIME_DEFAULT:
            return SeccompRequest(SeccompKind.RUNTIME_DEFAULT)
        if profile.profile_type == SECCOMP_UNCONFINED:
            return SeccompRequest(SeccompKind.UNCONFINED)
        if profile.profile_type == SECCOMP_LOCALHOST:
            return localhost_seccomp(profile.localhost_ref, f"{where}: seccomp Localhost localhost_ref")
        raise SpecInputError(f"{where}: seccomp profile_type {profile.profile_type} is unknown")
    path = sc.seccomp_profile_path
    if not path or path == SECCOMP_PATH_UNCONFINED:
        return SeccompRequest(SeccompKind.UNCONFINED)
    if path in SECCOMP_PATHS_RUNTIME_DEFAULT:
        return SeccompRequest(SeccompKind.RUNTIME_DEFAULT)
    if path.startswith(SECCOMP_LOCALHOST_PREFIX):
        return localhost_seccomp(path, f"{where}: seccomp_profile_path")
    raise SpecInputError(
        f"{where}: seccomp_profile_path {path!r} is unknown (use {', '.join(SECCOMP_PATHS_RUNTIME_DEFAULT)}, "
        f"{SECCOMP_PATH_UNCONFINED} or {SECCOMP_LOCALHOST_PREFIX}<absolute path>)")


def localhost_seccomp(ref: str, where: str) -> SeccompRequest:
    # kubelet sends an absolute path; older ones (and the deprecated field) put "localhost/" before it.
    path = ref.removeprefix(SECCOMP_LOCALHOST_PREFIX)
    if not path:
        raise SpecInputError(f"{where}: the profile path is empty")
    if not path.startswith("/"):
        raise SpecInputError(f"{where}: {path!r} must be an absolute path of a profile file on the node")
    return SeccompRequest(SeccompKind.LOCALHOST, path)


def check_seccomp_profile(sc: "cri.LinuxContainerSecurityContext") -> None:
    """Read and check a Localhost profile now, for callers that build the spec only later (restore)."""
    request = requested_seccomp(sc)
    if request.kind == SeccompKind.LOCALHOST and not sc.privileged:
        try:
            seccomp.read_localhost_profile(request.localhost_path)
        except seccomp.SeccompProfileError as e:
            raise SpecInputError(str(e)) from None


def seccomp_profile(sc: "cri.LinuxContainerSecurityContext", bounding: Iterable[str]) -> dict | None:
    """linux.seccomp for the container, or None for unconfined.

    RuntimeDefault is Docker's default profile and Localhost a profile file on the node, both
    evaluated against the container's final bounding set (oci/seccomp). A privileged container runs
    unconfined whatever it asks for, as in containerd and CRI-O.
    """
    if sc.privileged:
        return None
    request = requested_seccomp(sc)
    try:
        if request.kind == SeccompKind.RUNTIME_DEFAULT:
            return seccomp.runtime_default_seccomp(bounding)
        if request.kind == SeccompKind.LOCALHOST:
            profile = seccomp.read_localhost_profile(request.localhost_path)
            return seccomp.to_oci_seccomp(profile, bounding, f"seccomp profile {request.localhost_path}")
    except seccomp.SeccompProfileError as e:
        raise SpecInputError(str(e)) from None
    return None


def masked_paths(sc: "cri.LinuxContainerSecurityContext") -> list[str]:
    if sc.privileged:
        return []
    return list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS)


def readonly_paths(sc: "cri.LinuxContainerSecurityContext") -> list[str]:
    if sc.privileged:
        return []
    return list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)


# --- mounts ----------------------------------------------------------------

PROPAGATION_OPTION = {
    PROPAGATION_PRIVATE: "rprivate",
    PROPAGATION_HOST_TO_CONTAINER: "rslave",
    PROPAGATION_BIDIRECTIONAL: "rshared",
}
PROPAGATION_NAME = {
    PROPAGATION_PRIVATE: "PROPAGATION_PRIVATE",
    PROPAGATION_HOST_TO_CONTAINER: "PROPAGATION_HOST_TO_CONTAINER",
    PROPAGATION_BIDIRECTIONAL: "PROPAGATION_BIDIRECTIONAL",
}


def default_mounts(privileged: bool) -> list[dict]:
    """containerd's defaultMounts plus the cgroup mount its CRI plugin adds.

    /sys and /sys/fs/cgroup are writable only for privileged containers.
    """
    sys_access = "rw" if privileged else "ro"
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", sys_access]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", sys_access]},
    ]


def bind_mount(destination: str, source: str, readonly: bool, propagation: str = "rprivate") -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", propagation, "ro" if readonly else "rw"]}


def cri_mount(mount: "cri.Mount", recursive_read_only_supported: bool = False) -> dict:
    spec_mount = bind_mount(posixpath.normpath(mount.container_path), mount.host_path,
                            mount.readonly, PROPAGATION_OPTION[mount.propagation])
    if mount.recursive_read_only:
        if not recursive_read_only_supported:
            raise SpecInputError(f"mount {mount.container_path}: recursive read-only mounts need Linux 5.12 or "
                                 "later and a runc with the \"rro\" mount option; this node lacks one of them")
        spec_mount["options"].append("rro")
    return spec_mount


def container_mounts(inp: ContainerSpecInput, privileged: bool, readonly_rootfs: bool) -> list[dict]:
    """Default mounts, then the sandbox's files, then the request's mounts.

    A later mount at the same destination replaces an earlier one (a CRI mount over
    /etc/hosts or /dev/shm wins), and parents are mounted before their children.
    """
    layers = [default_mounts(privileged),
              # like containerd, the pod's files follow the rootfs' read-only flag
              [bind_mount(dest, src, readonly_rootfs) for dest, src in sorted(inp.sandbox_files.items())],
              [cri_mount(m, inp.recursive_read_only_supported) for m in inp.config.mounts]]
    by_destination: dict[str, dict] = {}
    for layer in layers:
        for mount in layer:
            key = posixpath.normpath(mount["destination"])
            by_destination.pop(key, None)
            by_destination[key] = mount
    for mount in inp.config.mounts:
        if not os.path.exists(mount.host_path):
            raise SpecInputError(f"mount {mount.container_path}: host path {mount.host_path} does not exist")
    return sorted(by_destination.values(), key=lambda m: path_depth(m["destination"]))


def path_depth(path: str) -> int:
    return len([p for p in posixpath.normpath(path).split("/") if p])


def rootfs_propagation(mounts: Iterable["cri.Mount"]) -> str | None:
    """A bidirectional mount only propagates back if the container's "/" is shared.

    "shared" rather than containerd's "rshared": the runtime-spec schema enumerates
    only private/shared/slave/unbindable (runc accepts both spellings). Slave mounts
    need nothing: runc's default rootfs propagation is already rslave.
    """
    if any(m.propagation == PROPAGATION_BIDIRECTIONAL for m in mounts):
        return "shared"
    return None


# --- devices ---------------------------------------------------------------

def container_devices(devices: Iterable["cri.Device"], privileged: bool) -> tuple[list[dict], list[dict]]:
    """(linux.devices, linux.resources.devices) for the request's devices.

    Deny everything, then allow each device; privileged containers get every host
    device node and an allow-all rule instead.
    """
    nodes: dict[str, dict] = {}
    rules: list[dict] = [{"allow": False, "access": "rwm"}]
    if privileged:
        for node in host_device_nodes():
            nodes[node["path"]] = node
        rules = [{"allow": True, "access": "rwm"}]
    for device in devices:
        permissions = device.permissions or "rwm"
        for node in device_nodes(device.host_path, device.container_path):
            nodes[node["path"]] = node
            if not privileged:
                rules.append({"allow": True, "type": node["type"], "major": node["major"],
                              "minor": node["minor"], "access": permissions})
    return list(nodes.values()), rules


def device_nodes(host_path: str, container_path: str) -> list[dict]:
    """One linux.devices entry per device node at host_path (a directory yields all below it)."""
    try:
        st = os.stat(host_path)
    except OSError as err:
        raise SpecInputError(f"device {host_path}: {err.strerror}") from err
    if stat.S_ISDIR(st.st_mode):
        found = []
        for dirpath, _, files in os.walk(host_path):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                node = device_node(path, os.path.join(container_path, os.path.relpath(path, host_path)))
                if node:
                    found.append(node)
        return found
    node = device_node(host_path, container_path)
    if node is None:
        raise SpecInputError(f"device {host_path} is not a character or block device")
    return [node]


def device_node(host_path: str, container_path: str) -> dict | None:
    try:
        st = os.stat(host_path)
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return {"path": container_path, "type": kind, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
            "fileMode": stat.S_IMODE(st.st_mode) & 0o777, "uid": st.st_uid, "gid": st.st_gid}


def host_device_nodes(root: str = "/dev") -> list[dict]:
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == root and d in HOST_DEV_SKIP_DIRS))
        for name in sorted(files):
            if dirpath == root and name in HOST_DEV_SKIP_FILES:
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            node = device_node(path, path)
            if node:
                found.append(node)
    return found


# --- resources -------------------------------------------------------------

def linux_resources_from_cri(resources: "cri.LinuxContainerResources | None") -> dict:
    """The runtime-spec linux.resources object for CRI resources (also the JSON
    `runc update --r` reads). Zero/empty CRI fields mean "not set" and are left out.
    No pids limit: Kubernetes sets that per pod, not per container."""
    out: dict = {}
    if resources is None:
        return out
    cpu: dict = {}
    if resources.cpu_shares > 0:
        cpu["shares"] = resources.cpu_shares
    if resources.cpu_quota != 0:
        cpu["quota"] = resources.cpu_quota
    if resources.cpu_period > 0:
        cpu["period"] = resources.cpu_period
    if resources.cpuset_cpus:
        cpu["cpus"] = resources.cpuset_cpus
    if resources.cpuset_mems:
        cpu["mems"] = resources.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict = {}
    if resources.memory_limit_in_bytes > 0:
        memory["limit"] = resources.memory_limit_in_bytes
    if resources.memory_swap_limit_in_bytes > 0:
        memory["swap"] = resources.memory_swap_limit_in_bytes
    if memory:
        out["memory"] = memory
    if len(resources.hugepage_limits):
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in resources.hugepage_limits]
    if len(resources.unified):
        # cgroup v2 only: runc rejects it on a v1 host, which is the honest outcome.
        out["unified"] = dict(resources.unified)
    return out


# --- annotations -----------------------------------------------------------

def container_annotations(inp: ContainerSpecInput) -> dict[str, str]:
    """The request's annotations, the daemon's, then the CRI ones (which win)."""
    meta = inp.sandbox_config.metadata
    annotations = {**dict(inp.config.annotations), **inp.annotations}
    sandbox_id = inp.sandbox_id or annotations.get(ANNOTATION_SANDBOX_ID, "")
    annotations.update({
        ANNOTATION_CONTAINER_TYPE: "container",
        ANNOTATION_CONTAINER_NAME: inp.config.metadata.name,
        ANNOTATION_SANDBOX_NAME: meta.name,
        ANNOTATION_SANDBOX_NAMESPACE: meta.namespace,
        ANNOTATION_SANDBOX_UID: meta.uid,
        ANNOTATION_IMAGE_NAME: inp.config.image.user_specified_image or inp.config.image.image,
    })
    if sandbox_id:
        annotations[ANNOTATION_SANDBOX_ID] = sandbox_id
    return annotations

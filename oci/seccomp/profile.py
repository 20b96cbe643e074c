"""Seccomp profiles in Docker's JSON format (a superset of the OCI `linux.seccomp` object) -> the OCI
`linux.seccomp` of one container, as moby's `setupSeccomp` and containerd's `seccomp.LoadProfile` do.

A profile may carry conditional rules: `includes`/`excludes` on the container's capabilities (its final
bounding set), on the host's architecture (libseccomp's names: "amd64", "arm64", "x86", ...) and on the
host's kernel version (`minKernel`). They are evaluated here, once, when the container's config is
built; `archMap` becomes the host architecture and its sub-architectures.

Profiles are checked strictly: an unknown key, action, operator or architecture is an error that
names the profile, rather than a rule silently dropped (a misspelt "syscalls" would otherwise leave
an allow-all profile allowing everything). What runc 1.1.5 cannot do is refused here too: seccomp
`flags` and SCMP_ACT_NOTIFY (which needs a seccomp agent pyshim does not have).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
import re
import stat
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

DEFAULT_PROFILE_FILE = "default.json"
DEFAULT_PROFILE_WHERE = f"the default seccomp profile ({DEFAULT_PROFILE_FILE})"
# Where default.json comes from (README.md here says how to update it); RuntimeStatus reports it.
DEFAULT_PROFILE_SOURCE = ("moby/profiles/seccomp v0.2.3 default.json "
                          "(moby/moby docker-v29.7.2, vendor/github.com/moby/profiles/seccomp)")
KERNEL_SECCOMP_ACTIONS = "/proc/sys/kernel/seccomp/actions_avail"
# A profile file on the node is read whole: Docker's default profile is 13 KiB.
MAX_PROFILE_BYTES = 1 << 20

# The actions runc 1.1.5 implements (`runc features`), but SCMP_ACT_NOTIFY: see NOTIFY_ACTION.
ACTIONS = frozenset({
    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP",
})
NOTIFY_ACTION = "SCMP_ACT_NOTIFY"
OPERATORS = frozenset({
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
})
# The architectures runc 1.1.5 (libseccomp 2.5) and the runtime-spec schema know.
ARCHITECTURES = frozenset({
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64",
})
# uname -m -> (libseccomp's name, which `arches` conditions use; the seccomp architecture archMap keys on)
MACHINE_ARCH = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "arm64": ("arm64", "SCMP_ARCH_AARCH64"),
    "i386": ("x86", "SCMP_ARCH_X86"), "i486": ("x86", "SCMP_ARCH_X86"),
    "i586": ("x86", "SCMP_ARCH_X86"), "i686": ("x86", "SCMP_ARCH_X86"),
    "armv7l": ("arm", "SCMP_ARCH_ARM"), "armv8l": ("arm", "SCMP_ARCH_ARM"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
}

PROFILE_KEYS = frozenset({"defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls", "flags",
                          "listenerPath", "listenerMetadata"})
SYSCALL_KEYS = frozenset({"names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes"})
FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})
ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
ARCH_MAP_KEYS = frozenset({"architecture", "subArchitectures"})
MAX_SYSCALL_ARG_INDEX = 5  # seccomp sees six syscall arguments
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
_KERNEL_VERSION = re.compile(r"^(\d+)\.(\d+)$")


class SeccompProfileError(ValueError):
    """A seccomp profile cannot be used; the message names the profile and what is wrong with it."""


@dataclass(frozen=True)
class HostPlatform:
    """What a profile's architecture and kernel conditions are evaluated against."""
    native_arch: str          # libseccomp's name of the host architecture ("amd64"); "" if unknown
    seccomp_arch: str         # its seccomp architecture ("SCMP_ARCH_X86_64"); "" if unknown
    kernel: tuple[int, int]   # (major, minor) of the running kernel


@functools.lru_cache(maxsize=1)
def host_platform() -> HostPlatform:
    native, seccomp_arch = MACHINE_ARCH.get(platform.machine(), ("", ""))
    return HostPlatform(native, seccomp_arch, kernel_version(os.uname().release))


def kernel_filters_syscalls() -> bool:
    """Whether this kernel has seccomp filters (CONFIG_SECCOMP_FILTER), which every profile needs."""
    return os.path.exists(KERNEL_SECCOMP_ACTIONS)


def enforcement_summary() -> dict:
    """What a container's seccomp is, for RuntimeStatus and people reading it."""
    return {
        "enabled": kernel_filters_syscalls(),
        "runtimeDefault": DEFAULT_PROFILE_SOURCE,
        "localhost": "the profile file on the node that localhost_ref names (Docker or OCI JSON)",
        "unset": "unconfined",
        "privileged": "unconfined whatever the profile",
        "restored": "the filters the checkpointed processes had (CRIU); exec gets the new request's profile",
    }


def kernel_version(release: str) -> tuple[int, int]:
    """(6, 1) for "6.1.0-18-amd64": like moby, minor revisions and distribution suffixes do not count."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# ---------------------------------------------------------------------------
# Reading profiles
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _default_profile_doc() -> dict:
    text = resources.files(__package__).joinpath(DEFAULT_PROFILE_FILE).read_text(encoding="utf-8")
    return parse_profile(text, DEFAULT_PROFILE_WHERE)


def default_profile() -> dict:
    """The RuntimeDefault profile in Docker's format (a copy: the parsed file is shared)."""
    return copy.deepcopy(_default_profile_doc())


def runtime_default_seccomp(capabilities: Iterable[str], host: HostPlatform | None = None) -> dict:
    """The OCI `linux.seccomp` of RuntimeDefault for a container whose bounding set is `capabilities`."""
    # to_oci_seccomp only reads the document, so the parsed file is not copied for every container.
    return to_oci_seccomp(_default_profile_doc(), capabilities, DEFAULT_PROFILE_WHERE, host)


def read_localhost_profile(path: str) -> dict:
    """The profile file `path` on the node (Docker or OCI JSON), checked; SeccompProfileError says why not."""
    where = f"seccomp profile {path}"
    if not path.startswith("/"):
        raise SeccompProfileError(f"{where}: must be an absolute path on the node")
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang CreateContainer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SeccompProfileError(f"{where}: no such file on the node") from None
    except OSError as e:
        raise SeccompProfileError(f"{where}: cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SeccompProfileError(f"{where}: not a regular file")
        if st.st_size > MAX_PROFILE_BYTES:
            raise SeccompProfileError(f"{where}: {st.st_size} bytes, more than the {MAX_PROFILE_BYTES} allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise SeccompProfileError(f"{where}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_BYTES:
        raise SeccompProfileError(f"{where}: more than the {MAX_PROFILE_BYTES} bytes allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeccompProfileError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_profile(text, where)


def parse_profile(text: str, where: str) -> dict:
    """The JSON object of a profile, its structure checked (check_profile)."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SeccompProfileError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise SeccompProfileError(f"{where}: not valid JSON: {e}") from None
    check_profile(doc, where)
    return doc


# ---------------------------------------------------------------------------
# Checking a profile
# ---------------------------------------------------------------------------

def check_profile(doc: Any, where: str) -> None:
    """Refuse a profile runc would refuse or misread, naming the first problem found."""
    if not isinstance(doc, dict):
        raise SeccompProfileError(f"{where}: must be a JSON object, not {_json_type(doc)}")
    _check_keys(doc, PROFILE_KEYS, where)
    action = doc.get("defaultAction")
    if action is None or action == "":
        # moby would run such a profile unconfined; asking for a profile and getting none is worse.
        raise SeccompProfileError(f"{where}: defaultAction is missing")
    _check_action(action, f"{where}: defaultAction")
    _check_uint(doc, "defaultErrnoRet", UINT32_MAX, where)
    if doc.get("flags"):
        raise SeccompProfileError(f"{where}: flags {doc['flags']!r}: runc 1.1.5 does not support seccomp flags")
    if doc.get("listenerPath") or doc.get("listenerMetadata"):
        raise SeccompProfileError(f"{where}: listenerPath/listenerMetadata: no seccomp agent runs here")
    architectures = _list_of(doc, "architectures", where)
    arch_map = _list_of(doc, "archMap", where)
    if architectures and arch_map:
        raise SeccompProfileError(f"{where}: both architectures and archMap are set; use one of them")
    for i, arch in enumerate(architectures):
        _check_architecture(arch, f"{where}: architectures[{i}]")
    for i, entry in enumerate(arch_map):
        _check_arch_map_entry(entry, f"{where}: archMap[{i}]")
    for i, rule in enumerate(_list_of(doc, "syscalls", where)):
        _check_syscall(rule, f"{where}: syscalls[{i}]")


def _check_syscall(rule: Any, where: str) -> None:
    if not isinstance(rule, dict):
        raise SeccompProfileError(f"{where}: must be an object, not {_json_type(rule)}")
    _check_keys(rule, SYSCALL_KEYS, where)
    names = _list_of(rule, "names", where)
    name = rule.get("name")
    if names and name:
        raise SeccompProfileError(f"{where}: both name and names are set; use one of them")
    if name is not None and not isinstance(name, str):
        raise SeccompProfileError(f"{where}: name must be a string")
    if not names and not name:
        raise SeccompProfileError(f"{where}: names is empty")
    for j, syscall in enumerate(names):
        if not isinstance(syscall, str) or not syscall:
            raise SeccompProfileError(f"{where}: names[{j}] must be a syscall name")
    if "action" not in rule:
        raise SeccompProfileError(f"{where}: action is missing")
    _check_action(rule["action"], f"{where}: action")
    _check_uint(rule, "errnoRet", UINT32_MAX, where)
    if rule.get("comment") is not None and not isinstance(rule["comment"], str):
        raise SeccompProfileError(f"{where}: comment must be a string")
    for j, arg in enumerate(_list_of(rule, "args", where)):
        _check_arg(arg, f"{where}: args[{j}]")
    for key in ("includes", "excludes"):
        _check_filter(rule.get(key), f"{where}: {key}")


def _check_arg(arg: Any, where: str) -> None:
    if not isinstance(arg, dict):
        raise SeccompProfileError(f"{where}: must be an object, not {_json_type(arg)}")
    _check_keys(arg, ARG_KEYS, where)
    if "index" not in arg or "op" not in arg:
        raise SeccompProfileError(f"{where}: index and op are required")
    _check_uint(arg, "index", MAX_SYSCALL_ARG_INDEX, where)
    _check_uint(arg, "value", UINT64_MAX, where)
    _check_uint(arg, "valueTwo", UINT64_MAX, where)
    if arg["op"] not in OPERATORS:
        raise SeccompProfileError(f"{where}: unknown operator {arg['op']!r} (known: {', '.join(sorted(OPERATORS))})")


def _check_filter(conditions: Any, where: str) -> None:
    if conditions is None:
        return
    if not isinstance(conditions, dict):
        raise SeccompProfileError(f"{where}: must be an object, not {_json_type(conditions)}")
    _check_keys(conditions, FILTER_KEYS, where)
    for key in ("caps", "arches"):
        for j, value in enumerate(_list_of(conditions, key, where)):
            if not isinstance(value, str) or not value:
                raise SeccompProfileError(f"{where}: {key}[{j}] must be a non-empty string")
    min_kernel = conditions.get("minKernel")
    if min_kernel not in (None, ""):
        if not isinstance(min_kernel, str) or not _KERNEL_VERSION.match(min_kernel) \
                or _min_kernel(min_kernel) == (0, 0):
            raise SeccompProfileError(f"{where}: minKernel {min_kernel!r} is not \"<kernel>.<major>\"")


def _check_arch_map_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise SeccompProfileError(f"{where}: must be an object, not {_json_type(entry)}")
    _check_keys(entry, ARCH_MAP_KEYS, where)
    arch = entry.get("architecture")
    if not isinstance(arch, str) or not arch.startswith("SCMP_ARCH_"):
        raise SeccompProfileError(f"{where}: architecture must name a SCMP_ARCH_*")
    # Entries of other hosts' architectures are never used here, so only their form is checked;
    # the entry of this host's architecture is checked again when it is used.
    for j, sub in enumerate(_list_of(entry, "subArchitectures", where)):
        if not isinstance(sub, str) or not sub.startswith("SCMP_ARCH_"):
            raise SeccompProfileError(f"{where}: subArchitectures[{j}] must name a SCMP_ARCH_*")


def _check_action(action: Any, where: str) -> None:
    if action == NOTIFY_ACTION:
        raise SeccompProfileError(f"{where}: {NOTIFY_ACTION} needs a seccomp agent, and none runs here")
    if action not in ACTIONS:
        raise SeccompProfileError(f"{where}: unknown action {action!r} (known: {', '.join(sorted(ACTIONS))})")


def _check_architecture(arch: Any, where: str) -> None:
    if arch not in ARCHITECTURES:
        raise SeccompProfileError(f"{where}: architecture {arch!r} is unknown to runc here")


def _check_keys(obj: dict, known: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise SeccompProfileError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                                  f"(known: {', '.join(sorted(known))})")


def _check_uint(obj: dict, key: str, maximum: int, where: str) -> None:
    value = obj.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise SeccompProfileError(f"{where}: {key} must be an integer from 0 to {maximum}, not {value!r}")


def _list_of(obj: dict, key: str, where: str) -> list:
    """obj[key] as a list; absent and null (Go's nil slice) are empty."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SeccompProfileError(f"{where}: {key} must be a list, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------
# Converting a checked profile
# ---------------------------------------------------------------------------

def to_oci_seccomp(doc: dict, capabilities: Iterable[str], where: str,
                   host: HostPlatform | None = None) -> dict:
    """The OCI `linux.seccomp` of a container whose bounding set is `capabilities`, from a profile that
    check_profile accepted: conditions evaluated, archMap resolved, Docker-only keys dropped."""
    host = host or host_platform()
    caps = frozenset(capabilities)
    out: dict = {"defaultAction": doc["defaultAction"]}
    if doc.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = doc["defaultErrnoRet"]
    architectures = list(doc.get("architectures") or []) or _host_architectures(doc, host, where)
    if architectures:
        out["architectures"] = architectures
    syscalls = [_oci_syscall(rule) for rule in doc.get("syscalls") or [] if _applies(rule, caps, host)]
    if syscalls:
        out["syscalls"] = syscalls
    return out


def _host_architectures(doc: dict, host: HostPlatform, where: str) -> list[str]:
    """The host's architecture and its sub-architectures from archMap; none (runc's native one only)
    when the map has no entry for the host."""
    for i, entry in enumerate(doc.get("archMap") or []):
        if host.seccomp_arch and entry["architecture"] == host.seccomp_arch:
            arches = [entry["architecture"], *(entry.get("subArchitectures") or [])]
            for j, arch in enumerate(arches):
                _check_architecture(arch, f"{where}: archMap[{i}]")
            return arches
    return []


def _applies(rule: dict, caps: frozenset[str], host: HostPlatform) -> bool:
    """moby's rule: excluded when any exclude condition holds, kept only when every include holds."""
    excludes = rule.get("excludes") or {}
    if host.native_arch in (excludes.get("arches") or []):
        return False
    if caps & set(excludes.get("caps") or []):
        return False
    if excludes.get("minKernel") and host.kernel >= _min_kernel(excludes["minKernel"]):
        return False
    includes = rule.get("includes") or {}
    if includes.get("arches") and host.native_arch not in includes["arches"]:
        return False
    if not set(includes.get("caps") or []) <= caps:
        return False
    if includes.get("minKernel") and host.kernel < _min_kernel(includes["minKernel"]):
        return False
    return True


def _min_kernel(text: str) -> tuple[int, int]:
    major, minor = _KERNEL_VERSION.match(text).groups()
    return int(major), int(minor)


def _oci_syscall(rule: dict) -> dict:
    out: dict = {"names": list(rule.get("names") or [rule["name"]]), "action": rule["action"]}
    if rule.get("errnoRet") is not None:
        out["errnoRet"] = rule["errnoRet"]
    args = [_oci_arg(arg) for arg in rule.get("args") or []]
    if args:
        out["args"] = args
    return out


def _oci_arg(arg: dict) -> dict:
    out = {"index": arg["index"], "value": arg.get("value") or 0, "op": arg["op"]}
    if arg.get("valueTwo"):
        out["valueTwo"] = arg["valueTwo"]
    return out

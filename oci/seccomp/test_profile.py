"""Tests for oci.seccomp.profile: Docker-format profiles -> OCI linux.seccomp, and their checks."""
from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources

import pytest

from oci.seccomp import profile as sp
from oci.seccomp.profile import HostPlatform, SeccompProfileError, check_profile, to_oci_seccomp
from oci.spec_schema import validate_spec

X86_64 = HostPlatform("amd64", "SCMP_ARCH_X86_64", (6, 1))
AARCH64 = HostPlatform("arm64", "SCMP_ARCH_AARCH64", (6, 1))
S390X = HostPlatform("s390x", "SCMP_ARCH_S390X", (6, 1))
OLD_KERNEL = HostPlatform("amd64", "SCMP_ARCH_X86_64", (4, 4))
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def names_with(seccomp: dict, action: str = "SCMP_ACT_ALLOW", plain: bool = True) -> set[str]:
    return {n for rule in seccomp.get("syscalls", []) if rule["action"] == action and (not plain or "args" not in rule)
            for n in rule["names"]}


def minimal_spec(seccomp: dict) -> dict:
    return {"ociVersion": "1.0.2", "root": {"path": "/rootfs"}, "linux": {"seccomp": seccomp}}


def test_default_profile_file_is_the_recorded_upstream_one():
    data = resources.files("oci.seccomp").joinpath("default.json").read_bytes()
    readme = resources.files("oci.seccomp").joinpath("README.md").read_text()
    assert hashlib.sha256(data).hexdigest() in readme, "default.json changed: update README.md's source and sha256"


@pytest.mark.parametrize("host, architectures", [
    (X86_64, ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    (AARCH64, ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
])
def test_default_profile_converts_for_the_host_architecture(host, architectures):
    seccomp = sp.runtime_default_seccomp(DEFAULT_CAPS, host)
    validate_spec(minimal_spec(seccomp))
    assert seccomp["architectures"] == architectures
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == 1
    allowed = names_with(seccomp)
    if host is X86_64:
        assert {"arch_prctl", "modify_ldt"} <= allowed and "arm_fadvise64_64" not in allowed
    else:
        assert {"arm_fadvise64_64", "breakpoint"} <= allowed and not {"arch_prctl", "modify_ldt"} & allowed
    assert not {"s390_runtime_instr", "riscv_flush_icache", "swapcontext"} & allowed
    # Docker-only keys never reach the OCI spec
    assert all(set(rule) <= {"names", "action", "errnoRet", "args"} for rule in seccomp["syscalls"])


def test_capability_conditions_follow_the_bounding_set():
    plain = sp.runtime_default_seccomp(DEFAULT_CAPS, X86_64)
    assert not {"reboot", "unshare", "setns", "bpf", "perf_event_open", "kcmp", "iopl"} & names_with(plain)
    clone_rules = [r for r in plain["syscalls"] if "clone" in r["names"]]
    assert clone_rules == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                            "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in plain["syscalls"]

    more = sp.runtime_default_seccomp(DEFAULT_CAPS + ["CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_BPF", "CAP_PERFMON"], X86_64)
    assert {"reboot", "unshare", "setns", "bpf", "perf_event_open", "clone", "clone3"} <= names_with(more)
    # with CAP_SYS_ADMIN the namespace-flag filter on clone and clone3's ENOSYS are excluded
    assert not [r for r in more["syscalls"] if r["action"] == "SCMP_ACT_ERRNO"]
    assert not [r for r in more["syscalls"] if "clone" in r["names"] and "args" in r]

    assert "chroot" not in names_with(sp.runtime_default_seccomp([], X86_64))


def test_s390_gets_its_own_clone_argument_order():
    seccomp = sp.runtime_default_seccomp(DEFAULT_CAPS, S390X)
    clone = [r for r in seccomp["syscalls"] if r["names"] == ["clone"]]
    assert [r["args"][0]["index"] for r in clone] == [1]
    assert seccomp["architectures"] == ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]


def test_kernel_conditions():
    assert {"ptrace", "process_vm_readv"} <= names_with(sp.runtime_default_seccomp(DEFAULT_CAPS, X86_64))
    assert "ptrace" not in names_with(sp.runtime_default_seccomp(DEFAULT_CAPS, OLD_KERNEL))
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["a"], "action": "SCMP_ACT_ERRNO", "excludes": {"minKernel": "5.0"}}]}
    assert "syscalls" not in to_oci_seccomp(doc, [], "p", X86_64)
    assert to_oci_seccomp(doc, [], "p", OLD_KERNEL)["syscalls"] == [{"names": ["a"], "action": "SCMP_ACT_ERRNO"}]
    assert sp.kernel_version("6.1.0-18-amd64") == (6, 1) and sp.kernel_version("3.12-rc5") == (3, 12)


def test_oci_format_profile_and_legacy_name_pass_through():
    doc = {"defaultAction": "SCMP_ACT_LOG", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [
        {"name": "kill", "action": "SCMP_ACT_KILL_PROCESS", "comment": "legacy single name"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
         "args": [{"index": 2, "op": "SCMP_CMP_MASKED_EQ", "value": 3, "valueTwo": 1}]}]}
    check_profile(doc, "p")
    seccomp = to_oci_seccomp(doc, [], "p", AARCH64)
    validate_spec(minimal_spec(seccomp))
    assert seccomp == {"defaultAction": "SCMP_ACT_LOG", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [
        {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
         "args": [{"index": 2, "value": 3, "op": "SCMP_CMP_MASKED_EQ", "valueTwo": 1}]}]}


def test_arch_map_without_the_host_leaves_architectures_to_runc():
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "archMap": [
        {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None}]}
    check_profile(doc, "p")
    assert to_oci_seccomp(doc, [], "p", X86_64) == {"defaultAction": "SCMP_ACT_ALLOW"}


def test_conversion_does_not_change_the_profile():
    doc = sp.default_profile()
    before = copy.deepcopy(doc)
    to_oci_seccomp(doc, DEFAULT_CAPS, "p", X86_64)
    assert doc == before
    assert sp.default_profile() is not sp.default_profile()


@pytest.mark.parametrize("doc, words", [
    ({}, "defaultAction is missing"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "needs a seccomp agent"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}, "does not support seccomp flags"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}, "no seccomp agent"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": -1}, "defaultErrnoRet must be an integer"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
      "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, "both architectures and archMap"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}, "'SCMP_ARCH_VAX' is unknown"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {"names": ["x"]}}, "syscalls must be a list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]},
     "syscalls[0]: names is empty"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "name": "b", "action": "SCMP_ACT_ERRNO"}]},
     "both name and names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"]}]}, "action is missing"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                         "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "index must be an integer from 0 to 5"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                         "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_SOME"}]}]},
     "unknown operator"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                         "args": [{"index": 0, "value": 1 << 64, "op": "SCMP_CMP_EQ"}]}]},
     "value must be an integer"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                         "includes": {"minKernel": "4"}}]}, "minKernel '4'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                         "includes": {"capabilities": ["CAP_X"]}}]},
     "unknown key(s) 'capabilities'"),
])
def test_invalid_profiles_are_refused_with_the_reason(doc, words):
    with pytest.raises(SeccompProfileError) as err:
        check_profile(doc, "seccomp profile /p.json")
    assert str(err.value).startswith("seccomp profile /p.json: ") and words in str(err.value)


def test_host_arch_map_entry_with_an_architecture_runc_lacks_is_refused():
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_I8086"]}]}
    check_profile(doc, "p")
    with pytest.raises(SeccompProfileError, match="SCMP_ARCH_I8086"):
        to_oci_seccomp(doc, [], "p", X86_64)


def test_parse_profile_reports_bad_json():
    with pytest.raises(SeccompProfileError, match="not valid JSON"):
        sp.parse_profile("{", "p")
    assert sp.parse_profile(json.dumps({"defaultAction": "SCMP_ACT_ERRNO"}), "p") == {"defaultAction": "SCMP_ACT_ERRNO"}


def test_enforcement_summary_names_the_default_profile_source():
    summary = sp.enforcement_summary()
    assert summary["runtimeDefault"] == sp.DEFAULT_PROFILE_SOURCE
    assert summary["enabled"] == sp.kernel_filters_syscalls()
    assert "v0.2.3" in sp.DEFAULT_PROFILE_SOURCE

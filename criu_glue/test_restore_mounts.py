"""The mount table in CRIU's images, held against the new request's spec."""
from __future__ import annotations

import dataclasses

import pytest

from criu_glue.restore_mounts import ImageMount, weaker_mounts
from oci.runtime_spec import DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, default_mounts

# mountpoints-13.img of a pyshim checkpoint (CRIU 4.2, runc 1.1, cgroup v1, kernel 6.18), one
# cgroup hierarchy kept: (mnt_id, parent, mountpoint, fstype, root, flags, sb_flags, ext_key).
DUMPED = [
    (76, 118, '/sys/firmware', 5, '/', 0x200001, 1, ''),
    (75, 116, '/proc/timer_list', 5, '/null', 0x1000002, 0, '/dev/null'),
    (74, 116, '/proc/keys', 5, '/null', 0x1000002, 0, '/dev/null'),
    (73, 116, '/proc/acpi', 5, '/', 0x200001, 1, ''),
    (72, 116, '/proc/sys', 1, '/sys', 0x20000f, 0, ''),
    (71, 116, '/proc/irq', 1, '/irq', 0x20000f, 0, ''),
    (70, 116, '/proc/fs', 1, '/fs', 0x20000f, 0, ''),
    (69, 116, '/proc/bus', 1, '/bus', 0x20000f, 0, ''),
    (126, 125, '/sys/fs/cgroup/cpu', 12, '/pod/cpu', 0x20000f, 0, '/sys/fs/cgroup/cpu'),
    (125, 118, '/sys/fs/cgroup', 5, '/', 0x20000e, 0, ''),
    (124, 115, '/etc/resolv.conf', 0, '/pod/resolv.conf', 0x200000, 0, '/etc/resolv.conf'),
    (123, 115, '/etc/hosts', 0, '/pod/hosts', 0x200000, 0, '/etc/hosts'),
    (122, 115, '/etc/hostname', 0, '/pod/hostname', 0x200000, 0, '/etc/hostname'),
    (121, 117, '/dev/mqueue', 14, '/', 0x20000e, 0, ''),
    (120, 117, '/dev/shm', 5, '/', 0x20000e, 0, ''),
    (119, 117, '/dev/pts', 6, '/', 0x20000a, 0, ''),
    (118, 115, '/sys', 2, '/', 0x20000f, 1, ''),
    (117, 115, '/dev', 5, '/', 0x1000002, 0, ''),
    (116, 115, '/proc', 1, '/', 0x20000e, 0, ''),
    (115, 68, '/', 17, '/', 0x200000, 0, ''),
]
# On that host these masked and read-only paths exist; the others do not (runc skips them).
EXISTING = {"/proc/keys", "/proc/timer_list", "/proc/acpi", "/sys/firmware", "/proc/sys",
            "/proc/irq", "/proc/fs", "/proc/bus"}


def mounts(changes=None, extra=()):
    out = []
    for mnt_id, parent, point, fstype, root, flags, sb_flags, ext in DUMPED:
        m = ImageMount("mountpoints-13.img", mnt_id, parent, point, fstype, root, flags, sb_flags, ext)
        out.append(dataclasses.replace(m, **(changes or {}).get(point, {})))
    return out + [ImageMount("mountpoints-13.img", *e) for e in extra]


def spec(privileged=False, readonly_root=False, **linux):
    binds = [{"destination": d, "type": "bind", "source": "/pod" + d,
              "options": ["rbind", "rprivate", "ro" if readonly_root else "rw"]}
             for d in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")]
    return {"root": {"path": "rootfs", "readonly": readonly_root},
            "mounts": default_mounts(privileged) + binds,
            "linux": {"maskedPaths": [] if privileged else list(DEFAULT_MASKED_PATHS),
                      "readonlyPaths": [] if privileged else list(DEFAULT_READONLY_PATHS), **linux}}


def weaker(image_mounts, new_spec=None):
    return weaker_mounts(image_mounts, new_spec or spec(), lambda p: p in EXISTING)


def test_pyshims_own_checkpoint_is_as_strong_as_a_fresh_container():
    assert weaker(mounts()) == []


def test_a_privileged_request_accepts_them_too():
    assert weaker(mounts(), spec(privileged=True)) == []


@pytest.mark.parametrize("changes, problem", [
    ({"/proc/sys": {"flags": 0x20000e}}, "/proc/sys is writable (the request makes it read-only)"),
    ({"/sys": {"flags": 0x20000e, "sb_flags": 0}}, "/sys is writable (the request mounts it read-only)"),
    ({"/proc/keys": {"ext_key": "", "fstype": 1, "root": "/keys"}}, "/proc/keys is not masked"),
    ({"/proc/acpi": {"flags": 0x200000, "sb_flags": 0}}, "/proc/acpi is not masked"),
    ({"/dev/shm": {"flags": 0x200000}}, "/dev/shm lacks nosuid, nodev, noexec"),
    ({"/proc": {"flags": 0x20000a}}, "/proc lacks nodev"),
    ({"/sys/fs/cgroup/cpu": {"flags": 0x20000e}}, "/sys/fs/cgroup/cpu is a writable cgroup filesystem"),
    ({"/proc/sys": {"root": "/"}}, "/proc/sys shows procfs's /, not its own path"),
    ({"/proc": {"fstype": 5}}, "/proc is not a proc mount"),
])
def test_each_weakening_is_named(changes, problem):
    found = weaker(mounts(changes))
    assert any(p.startswith(problem) for p in found), found


def test_a_missing_mask_or_read_only_bind_is_weaker():
    without = [m for m in mounts() if m.mountpoint not in ("/proc/timer_list", "/proc/sys")]
    found = weaker(without)
    # /proc/sys is then the writable /proc itself.
    assert "/proc/timer_list is not masked (the request masks it)" in found
    assert "/proc/sys is writable (the request makes it read-only)" in found


def test_a_second_proc_or_sysfs_elsewhere_is_weaker():
    found = weaker(mounts(extra=[(200, 115, "/mnt/proc", 1, "/", 0x20000e, 0, ""),
                                 (201, 115, "/mnt/sys", 2, "/", 0x20000f, 1, "")]))
    assert "procfs is mounted at /mnt/proc, where the request mounts none" in found
    assert "sysfs is mounted at /mnt/sys, where the request mounts none" in found


def test_a_writable_mount_stacked_over_the_read_only_one_is_what_counts():
    found = weaker(mounts(extra=[(201, 72, "/proc/sys", 1, "/sys", 0x20000e, 0, "")]))
    assert "/proc/sys is writable (the request makes it read-only)" in found


def test_read_only_rootfs_and_its_binds_stay_read_only():
    strong = spec(readonly_root=True)
    found = weaker(mounts(), strong)
    assert "the root filesystem is writable (the request makes it read-only)" in found
    assert "/etc/hosts is writable (the request mounts it read-only)" in found
    ro = {p: {"flags": 0x200001} for p in ("/", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")}
    assert weaker(mounts(ro), strong) == []


def test_paths_that_do_not_exist_need_no_mask_and_extra_masks_are_fine():
    assert weaker(mounts(), spec(maskedPaths=["/proc/kcore", "/proc/keys"])) == []
    found = weaker(mounts(), spec(maskedPaths=["/proc/keys", "/proc/fs"]))
    assert found == ["/proc/fs is not masked (the request masks it)"]


def test_from_entry_reads_crits_numbers_and_hex_strings():
    entry = {"mnt_id": 72, "parent_mnt_id": 116, "mountpoint": "proc/sys", "fstype": 1, "root": "/sys",
             "flags": "0x20000f", "sb_flags": 0}
    m = ImageMount.from_entry(entry)
    assert m.mountpoint == "/proc/sys" and m.read_only and m.flags == 0x20000f
    with pytest.raises(ValueError):
        ImageMount.from_entry(dict(entry, flags=[1]))

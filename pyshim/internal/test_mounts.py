"""Reading overlay layers back from mountinfo (the container record does not keep them)."""
from __future__ import annotations

from pathlib import Path

from pyshim.internal.mounts import overlay_lower_dirs


def test_overlay_lower_dirs_reads_mountinfo_escapes(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "91 1 0:45 / /var/lib/p\\040s/c1/rootfs rw,relatime - overlay overlay "
        "rw,lowerdir=/l/top\\054x:/l/mid\\134\\072colon:/l/bottom,upperdir=/u,workdir=/w\n"
        "92 1 0:46 / /var/lib/c2/rootfs rw - overlay overlay rw,lowerdir+=/l/a,lowerdir+=/l/b,upperdir=/u2\n"
        "93 1 0:47 / /var/lib/c3/rootfs rw - ext4 /dev/vda rw\n")
    assert overlay_lower_dirs(Path("/var/lib/p s/c1/rootfs"), str(mountinfo)) == \
        [Path("/l/top,x"), Path("/l/mid:colon"), Path("/l/bottom")]
    assert overlay_lower_dirs(Path("/var/lib/c2/rootfs"), str(mountinfo)) == [Path("/l/a"), Path("/l/b")]
    assert overlay_lower_dirs(Path("/var/lib/c3/rootfs"), str(mountinfo)) == []
    assert overlay_lower_dirs(Path("/nowhere"), str(mountinfo)) == []

"""Stand-ins for the images critest names, built here from the busybox test image (no network).

Every stand-in is pushed to the loopback registry twice over: at each of its names' repository and
tag (`gcr.io/k8s-staging-cri-tools/test-image-tag:test` -> `REGISTRY/k8s-staging-cri-tools/
test-image-tag:test`), where the daemon finds it through its registry mirrors, and at
`<repository>:latest`, where critest looks with `-registry-prefix` (which drops tags and digests).
Images containers are made from are also imported into the daemon's store under their original
names, which `-registry-prefix` needs (it creates containers under the original names).
Every stand-in has a configuration of its own (a label naming it), hence an image ID of its own:
an Image Manager spec removes what it pulled by ID, and must never take another spec's image along.
No stand-in can have the digest critest pins for `test-image-digest@sha256:...`: that spec fails.
"""
from __future__ import annotations

import io
import platform
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from integration.testimage import (FIXED_MTIME, build_static_tools, busybox_config, host_program_files,
                                  write_busybox_layers)
from oci.layout import import_oci_archive, write_oci_layout
from oci.reference import Reference
from oci.registry import RegistryClient
from oci.store import ImageStore

HERE = Path(__file__).resolve().parent
E2E = "registry.k8s.io/e2e-test-images"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
LABEL = "io.pyshim.conformance.stand-in"

# critest's test image ports (pkg/validate/consts.go): the web server's container port, and the
# port its host-network web server image listens on.
WEB_PORT = 80
HOSTNET_WEB_PORT = 12003

PASSWD_BASE = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP_BASE = "root:x:0:\nnobody:x:65534:\n"


@dataclass(frozen=True)
class StandIn:
    """One image critest names: `names` as critest writes them, `files` added on top of busybox
    (path -> (content, mode)), `config` merged into the image config (User, Entrypoint, Cmd)."""
    names: tuple[str, ...]
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    # Imported into the daemon's store under `names` (containers are made from it).
    in_store: bool = True

    @property
    def registry_path(self) -> str:
        """Where critest pulls it from with -registry-prefix: the name's path, tag dropped."""
        return Reference.parse(self.names[0]).repository

    @property
    def mirror_paths(self) -> list[str]:
        """`repository:tag` of each name, where the daemon's mirrors look (untagged = latest)."""
        return [f"{ref.repository}:{ref.tag or 'latest'}" for ref in map(Reference.parse, self.names)]

    @property
    def registries(self) -> set[str]:
        return {Reference.parse(name).registry for name in self.names}


def _user_files(passwd: str, group: str) -> dict[str, tuple[bytes, int]]:
    return {"etc/passwd": ((PASSWD_BASE + passwd).encode(), 0o644),
            "etc/group": ((GROUP_BASE + group).encode(), 0o644)}


def stand_ins(tools: dict[str, tuple[bytes, int]]) -> list[StandIn]:
    web, nnp = tools["webserver"], tools["nnp"]
    www_data = _user_files("www-data:x:33:33:www-data:/var/www:/bin/false\n", "www-data:x:33:\n")
    return [
        # framework.DefaultLinuxContainerImage: most specs.
        StandIn((f"{E2E}/busybox:1.29-2",)),
        # webServerImage and the HostPID/PodPID specs' nginx: a page on port 80, /var/run/nginx.pid,
        # a process named nginx.
        StandIn((f"{E2E}/nginx:1.14-2",), {"usr/sbin/nginx": web, "var/run/.keep": (b"", 0o644)},
                {"Cmd": ["/usr/sbin/nginx", str(WEB_PORT), "/var/run/nginx.pid"],
                 "ExposedPorts": {f"{WEB_PORT}/tcp": {}}}),
        StandIn((f"{CRI_TOOLS}/hostnet-nginx-{GOARCH}",), {"usr/sbin/nginx": web},
                {"Cmd": ["/usr/sbin/nginx", str(HOSTNET_WEB_PORT)]}),
        # The Multiple Containers spec's httpd: a page on port 80, "httpd" in its log.
        StandIn((f"{E2E}/httpd:2.4.39-4",), {"usr/local/bin/httpd": web},
                {"Cmd": ["/usr/local/bin/httpd", str(WEB_PORT)]}),
        # NoNewPrivs: a set-uid root program printing its effective uid.
        StandIn((f"{E2E}/nonewprivs:1.3",), {"usr/local/bin/nnp": (nnp[0], 0o4755)},
                {"Entrypoint": ["/usr/local/bin/nnp"]}),
        # SupplementalGroupsPolicy: default-user (1000) is also in group-defined-in-image (50000).
        StandIn((f"{CRI_TOOLS}/test-image-predefined-group",),
                _user_files("default-user:x:1000:1000::/home/default-user:/bin/sh\n",
                            "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
                {"User": "1000"}),
        # Image Manager specs: pulled, inspected and removed by critest itself.
        *[StandIn((f"{CRI_TOOLS}/{name}",), files, {"User": user}, in_store=False) for name, files, user in [
            ("test-image-user-uid", {}, "1002"),
            ("test-image-user-username", www_data, "www-data"),
            ("test-image-user-uid-group", {}, "1003:users"),
            ("test-image-user-username-group", www_data, "www-data:www-data"),
        ]],
        *[StandIn((f"{CRI_TOOLS}/{name}",), in_store=False) for name in [
            "test-image-latest", "test-image-digest",
            "test-image-1:latest", "test-image-2:latest", "test-image-3:latest"]],
        StandIn((f"{CRI_TOOLS}/test-image-tag:test", f"{CRI_TOOLS}/test-image-tag:all"), in_store=False),
        # One image under three tags.
        StandIn(tuple(f"{CRI_TOOLS}/test-image-tags:{n}" for n in (1, 2, 3)), in_store=False),
        # Same image from two registries: both names map to REGISTRY/pause.
        StandIn(("registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"), in_store=False),
    ]


def _extra_layer(path: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def download_shell_busybox(work: Path) -> Path:
    """Debian's dynamically linked busybox (package `busybox`), unpacked under `work`.

    The host's busybox-static is built with FEATURE_SH_STANDALONE: its shell runs applets itself and
    never executes /bin/ls, so the MaskedPaths spec (mask /bin/ls, expect `sh -c ls` to fail) cannot
    pass with it. The real busybox images' shell, like the dynamic package's, executes what PATH finds.
    The package conflicts with busybox-static, so it is downloaded and unpacked, not installed."""
    target = work / "busybox-deb"
    try:
        subprocess.run(["apt-get", "download", "busybox"], cwd=work, check=True, capture_output=True, text=True)
        [deb] = work.glob("busybox_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, capture_output=True, text=True)
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise RuntimeError(f"`apt-get download busybox` (Debian's dynamic busybox, for the stand-in images' "
                           f"shell) failed; run `apt-get update` and retry: {detail}") from None
    return target / "bin" / "busybox"


def _common_files(busybox: Path, tools: dict[str, tuple[bytes, int]]) -> dict[str, tuple[bytes, int]]:
    """On top of busybox in every stand-in: the dynamic busybox's libraries, and two programs it
    lacks: `ipcs` (HostIpc specs; util-linux's, from the host) and `pgrep` (ExecSync timeout spec)."""
    libraries = {name: data for name, data in host_program_files({"bin/busybox": busybox}).items()
                 if name != "bin/busybox"}
    return {**libraries, **host_program_files({"usr/bin/ipcs": Path("/usr/bin/ipcs")}),
            "usr/bin/pgrep": tools["pgrep"]}


def build_layouts(work: Path) -> list[tuple[StandIn, Path]]:
    """An OCI layout per stand-in under `work`, listing the image under each of its names."""
    tools = build_static_tools({name: HERE / f"{name}.c" for name in ("webserver", "nnp", "pgrep")})
    busybox = download_shell_busybox(work)
    # Hard links like the real busybox images: the MaskedPaths spec masks /bin/ls, which must not
    # mask /bin/busybox (and with it the shell) through a symlink.
    base_layers = write_busybox_layers(work, hardlinks=True, busybox=busybox)
    base_layers.append(_extra_layer(work / "common.tar", _common_files(busybox, tools)))
    built = []
    for i, image in enumerate(stand_ins(tools)):
        layers = list(base_layers)
        if image.files:
            layers.append(_extra_layer(work / f"extra-{i}.tar", image.files))
        config = busybox_config({LABEL: image.names[0]})
        config["config"].update(image.config)
        layout = work / f"layout-{i}"
        for name in image.names:
            write_oci_layout(layout, layers, config, name)
        built.append((image, layout))
    return built


def push_to_registry(built: list[tuple[StandIn, Path]], registry_address: str) -> None:
    """Push every stand-in where the mirrors look and where -registry-prefix looks (module doc)."""
    client = RegistryClient(insecure_registries=(registry_address,))
    with tempfile.TemporaryDirectory(prefix="pyshim-conformance-push-") as tmp:
        store = ImageStore(Path(tmp) / "store")
        for image, layout in built:
            [record] = import_oci_archive(store, layout)
            for path in dict.fromkeys([*image.mirror_paths, f"{image.registry_path}:latest"]):
                client.push(store, record, f"{registry_address}/{path}")


def mirrors_for(built: list[tuple[StandIn, Path]], registry_address: str) -> dict[str, tuple[str, ...]]:
    """The daemon's images.mirrors: every registry critest names, served by the loopback registry."""
    return {registry: (registry_address,) for image, _ in built for registry in sorted(image.registries)}

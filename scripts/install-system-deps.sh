#!/usr/bin/env bash
# Installs the system parts pyshim drives: runc, CRIU 4.2 (Debian forky), conmon, CNI plugins,
# iptables, docker-registry (tests), busybox-static (test image), gcc + libc6-dev (static test tools
# for the test image), and Podman 5 + checkpointctl (Debian trixie; the tests use them as real
# producers and readers of checkpoint archives).
# Idempotent: CI runs it every time.
#
# Why forky for CRIU: bookworm's 3.17 fails on kernels >= 6.x vDSO layouts, trixie's 4.1.1 cannot
# dump TCP sockets on kernels >= 6.16. The sources are pinned low so nothing else moves.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-system-deps: must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

BOOKWORM_PKGS=(runc iptables iproute2 conmon containernetworking-plugins docker-registry busybox-static util-linux)

# Podman 5.4 with the containers-common/-image configs and netavark it was released with (trixie),
# named one by one so that nothing else moves: runc, conmon, criu, iptables and python3 stay as
# they are (apt-get install -s shows 1 upgraded, libgpg-error0; libgpg-error-dev, if present,
# is removed). No recommends: they would bring buildah, passt, slirp4netns, libcriu2 and more.
PODMAN_PKGS=(podman/trixie libgpg-error0/trixie libgpgme11t64/trixie
             golang-github-containers-common/trixie golang-github-containers-image/trixie
             netavark/trixie checkpointctl/trixie)
# What installing PODMAN_PKGS must never upgrade, downgrade or remove.
KEEP_PKGS_RE='^(Inst|Remv) (runc|crun|conmon|criu|iptables|python3[.0-9]*|python3[.0-9]*-minimal|libpython3[.0-9]*-(minimal|stdlib)) '

podman_ok() {
    command -v podman >/dev/null 2>&1 && podman --version 2>/dev/null | grep -qE 'version ([5-9]|[1-9][0-9])\.' &&
        command -v checkpointctl >/dev/null 2>&1
}

criu_ok() {
    command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -qE 'Version: 4\.([2-9]|[1-9][0-9])' &&
        [ -x /usr/bin/crit ]
}

# gcc with the C library's headers and static libc (integration/tools/*.c are built `gcc -static`
# into the test image). libc6-dev must be exactly the installed libc6, which is trixie's once CRIU
# is in (see below).
toolchain_ok() {
    command -v gcc >/dev/null 2>&1 &&
        [ "$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' libc6-dev 2>/dev/null)" = \
          "ii $(dpkg-query -W -f='${Version}' libc6)" ]
}

all_present() {
    criu_ok || return 1
    toolchain_ok || return 1
    podman_ok || return 1
    for bin in runc iptables ip conmon busybox docker-registry; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/bin/$bin" ] || [ -x "/usr/sbin/$bin" ] || return 1
    done
    [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ]
}

if all_present; then
    echo "install-system-deps: everything present"
    exit 0
fi

cat > /etc/apt/sources.list.d/pyshim-trixie-forky.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC

cat > /etc/apt/preferences.d/pyshim-pins <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=forky
Pin-Priority: 50
PIN

# The reachable mirror is a dated snapshot: forky's Release file would be rejected as expired.
apt-get -o Acquire::Check-Valid-Until=false update -q

# Plain bookworm packages first: installing iptables after forky libs fails on libxtables12.
apt-get install -y -q --no-install-recommends "${BOOKWORM_PKGS[@]}"

if ! criu_ok; then
    apt-get install -y -q --no-install-recommends \
        criu/forky libcompel1/forky libnet9/forky libnl-3-200/forky \
        libc6/trixie libc-bin/trixie base-files/trixie \
        libgnutls30t64/trixie libhogweed6t64/trixie libnettle8t64/trixie libp11-kit0/trixie libgmp10/trixie
    # crit, CRIU's own image decoder (checkpoint inspection, dump statistics); it runs on the system
    # python3 with Debian's protobuf, apart from pyshim's venv. Must match CRIU's version, hence forky.
    apt-get install -y -q --no-install-recommends python3-pycriu/forky
fi

if ! podman_ok; then
    plan=$(apt-get install -s -q --no-install-recommends "${PODMAN_PKGS[@]}")
    if moved=$(grep -E "$KEEP_PKGS_RE" <<<"$plan"); then
        echo "install-system-deps: installing Podman would change these, refusing:" >&2
        echo "$moved" >&2
        exit 1
    fi
    apt-get install -y -q --no-install-recommends "${PODMAN_PKGS[@]}"
fi

if ! toolchain_ok; then
    libc_version=$(dpkg-query -W -f='${Version}' libc6)
    TOOLCHAIN_PKGS=(gcc "libc6-dev=$libc_version" "libc-dev-bin=$libc_version")
    plan=$(apt-get install -s -q --no-install-recommends "${TOOLCHAIN_PKGS[@]}")
    # Trixie's libc6-dev breaks bookworm's libdpkg-perl: an installed dpkg-dev moves to trixie's
    # (two perl packages) rather than being removed.
    if grep -qE '^Remv (dpkg-dev|libdpkg-perl) ' <<<"$plan"; then
        TOOLCHAIN_PKGS+=(dpkg-dev/trixie libdpkg-perl/trixie)
        plan=$(apt-get install -s -q --no-install-recommends "${TOOLCHAIN_PKGS[@]}")
    fi
    if moved=$(grep -E "$KEEP_PKGS_RE|^Remv " <<<"$plan"); then
        echo "install-system-deps: installing the C toolchain would change these, refusing:" >&2
        echo "$moved" >&2
        exit 1
    fi
    apt-get install -y -q --no-install-recommends "${TOOLCHAIN_PKGS[@]}"
fi

all_present || { echo "install-system-deps: something is still missing after install" >&2; exit 1; }
criu --version
podman --version
echo "install-system-deps: done"

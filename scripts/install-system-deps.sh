#!/usr/bin/env bash
# Installs the system parts pyshim drives: runc, CRIU 4.2 (Debian forky), conmon, CNI plugins,
# iptables, docker-registry (tests), busybox-static (test image). Idempotent: CI runs it every time.
#
# Why forky for CRIU: bookworm's 3.17 fails on kernels >= 6.x vDSO layouts, trixie's 4.1.1 cannot
# dump TCP sockets on kernels >= 6.16. The sources are pinned low so nothing else moves.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-system-deps: must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

BOOKWORM_PKGS=(runc iptables iproute2 conmon containernetworking-plugins docker-registry busybox-static util-linux)

criu_ok() {
    command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -qE 'Version: 4\.([2-9]|[1-9][0-9])' &&
        [ -x /usr/bin/crit ]
}

all_present() {
    criu_ok || return 1
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

all_present || { echo "install-system-deps: something is still missing after install" >&2; exit 1; }
criu --version
echo "install-system-deps: done"

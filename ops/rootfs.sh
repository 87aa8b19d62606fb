#!/usr/bin/env bash
# Build (once) and print the path of a cached Debian bookworm root file system tarball.
#
#   ops/rootfs.sh base      minbase + python3, python3-venv, python3-pip, ca-certificates, with `python`
#                           and `pip` commands like the python:3.11-slim image's (a stand-in for it)
#   ops/rootfs.sh systemd   base + systemd, systemd-sysv, dbus, procps: bootable with systemd-nspawn -b
#
# Tarballs live in $LICENSE_SERVER_ROOTFS_CACHE (default /var/tmp/license-server-rootfs) under a name
# that includes a hash of this script and of the host's local CA certificates, so editing the package
# lists below builds fresh ones. Those CAs (/usr/local/share/ca-certificates, e.g. a TLS-inspecting
# egress proxy's) are trusted inside too, so pip reaches PyPI from the rootfs as it does from the host.
# Needs root.
set -euo pipefail

SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
SYSTEMD_PACKAGES=(systemd systemd-sysv dbus procps)

CACHE=${LICENSE_SERVER_ROOTFS_CACHE:-/var/tmp/license-server-rootfs}
LOCAL_CAS=/usr/local/share/ca-certificates
cache_inputs() {
    cat "${BASH_SOURCE[0]}"
    if [[ -d $LOCAL_CAS ]]; then
        find "$LOCAL_CAS" -name '*.crt' -print0 | sort -z | xargs -0 -r cat
    fi
}
HASH=$(cache_inputs | sha256sum | cut -c1-12)

log() { printf 'rootfs: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian mirror apt already uses here (deb822 or one-line sources), unless given.
mirror() {
    if [[ -n ${LICENSE_SERVER_DEBIAN_MIRROR:-} ]]; then
        echo "$LICENSE_SERVER_DEBIAN_MIRROR"
        return
    fi
    local found
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
                2>/dev/null \
            | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' \
            | grep -oE '(https?|file):/[^[:space:]]+' \
            | grep -vE -- '-security|security\.debian' \
            | grep -E '/debian/?$' \
            | head -n1 || true)
    echo "${found:-http://deb.debian.org/debian}"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2; }
}

pack() {  # pack DIR TARBALL: write atomically, drop older builds of the same flavour
    local dir=$1 tarball=$2 flavour
    flavour=$(basename "$tarball" | sed -E 's/-[0-9a-f]{12}\.tar$//')
    tar --numeric-owner --xattrs --acls -C "$dir" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    find "$CACHE" -maxdepth 1 -name "$flavour-*.tar" ! -name "$(basename "$tarball")" -delete
}

build_base() {
    local tarball=$1 work
    ensure_debootstrap
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "rm -rf '$work'" EXIT
    local url
    url=$(mirror)
    log "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $url"
    mkdir -p "$CACHE/debs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$CACHE/debs" \
        "$SUITE" "$work/root" "$url" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    local root=$work/root
    # What the python:3.11-slim image offers: python, python3 and pip on PATH, pip usable outside a venv.
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    if compgen -G "$LOCAL_CAS/*.crt" >/dev/null; then
        cp "$LOCAL_CAS"/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the rootfs"
    fi
    chroot "$root" apt-get clean
    pack "$root" "$tarball"
    rm -rf "$work"
    trap - EXIT
}

build_systemd() {
    local tarball=$1 base work
    base=$(flavour_path base)
    [[ -f $base ]] || build_base "$base"
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    mkdir "$work/root"
    tar --numeric-owner --xattrs --acls -C "$work/root" -xf "$base"
    local root=$work/root
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    log "adding ${SYSTEMD_PACKAGES[*]}"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${SYSTEMD_PACKAGES[@]}" >"$work/apt.log" 2>&1 \
        || { tail -n 30 "$work/apt.log" >&2; die "apt-get install in the rootfs failed"; }
    chroot "$root" apt-get clean
    rm -f "$root/etc/resolv.conf"
    # A machine that boots quickly and quietly in a container: no login prompt, no periodic jobs.
    local unit
    for unit in console-getty.service getty@.service apt-daily.timer apt-daily-upgrade.timer \
                dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    : >"$root/etc/machine-id"
    pack "$root" "$tarball"
    rm -rf "$work"
    trap - EXIT
}

flavour_path() { echo "$CACHE/$SUITE-$1-$HASH.tar"; }

main() {
    local flavour=${1:-}
    [[ $flavour == base || $flavour == systemd ]] || die "usage: $0 base|systemd"
    [[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot)"
    mkdir -p "$CACHE"
    local tarball
    tarball=$(flavour_path "$flavour")
    # One builder at a time; a second caller waits and then finds the tarball made.
    exec 9>"$CACHE/.lock"
    flock -w 900 9 || die "timed out waiting for another build of $CACHE"
    if [[ ! -f $tarball ]]; then
        "build_$flavour" "$tarball"
        log "built $tarball ($(du -h "$tarball" | cut -f1))"
    fi
    echo "$tarball"
}

main "$@"

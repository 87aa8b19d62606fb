#!/usr/bin/env bash
# Check systemd/license-server.service for real, as root: lint the unit, rate its sandbox with
# `systemd-analyze security` (must stay "OK" or better), then boot a Debian bookworm container with
# systemd-nspawn, install the daemon into it with systemd/install.sh from a wheel of this checkout, and
# drive the service: READY, SDK calls through it to a fake upstream on loopback, SIGHUP, SIGKILL and a
# restart that keeps its state, a clean stop. Needs the repo venv (.venv with the dev extra).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
UNIT=license-server.service
# 4.9 on systemd-analyze's 0-10 scale: the highest exposure still rated OK (5.0 is MEDIUM).
SECURITY_THRESHOLD=49
PRODUCT=3349
LICENSE_KEY=ICVLD-VVSZR-ZTICT-YKGXL
MACHINE=check-systemd-machine

CACHE=${LICENSE_SERVER_ROOTFS_CACHE:-/var/tmp/license-server-rootfs}
STARTED=$SECONDS
MACHINE_NAME=license-server-check-$$
WORK=
NSPAWN_PID=
LEADER=
FAKE_PID=

CHECK=check-systemd
# shellcheck source=ops/lib.sh
source "$REPO/ops/lib.sh"

# A command inside the booted container, with a clean environment and a time limit.
inside() {
    local limit=$1
    shift
    timeout "$limit" nsenter --target "$LEADER" --all \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb \
        HOME=/root "$@"
}

prop() { inside 10 systemctl show --property="$1" --value "$UNIT"; }

# wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what: not within ${limit}s"
        sleep 0.5
    done
}

cleanup() {
    local status=$?
    set +e
    if ((status != 0)) && [[ -f $WORK/console.log ]]; then
        # Before the power-off below fills the console with its own lines.
        echo "--- container console (last 40 lines before stopping it) ---" >&2
        tail -n 40 "$WORK/console.log" >&2
    fi
    if ((status != 0)) && [[ -n $LEADER ]] && kill -0 "$LEADER" 2>/dev/null; then
        echo "--- init: pid $LEADER, $(cat "/proc/$LEADER/comm" 2>/dev/null); state: $(inside 5 systemctl is-system-running 2>&1) ---" >&2
        echo "--- jobs still queued ---" >&2
        inside 10 systemctl --no-pager list-jobs >&2
        echo "--- journal of $UNIT in the container (last 60 lines) ---" >&2
        inside 20 journalctl --no-pager -u "$UNIT" -n 60 -o short-precise >&2
        echo "--- failed units ---" >&2
        inside 10 systemctl --no-pager --failed >&2
    fi
    if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # SIGTERM asks the container's systemd to power off; then nspawn exits.
        kill -TERM "$NSPAWN_PID"
        local deadline=$((SECONDS + 30))
        while kill -0 "$NSPAWN_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    stop_fake_upstream
    # nspawn cannot remove this itself where /run is not a tmpfs.
    rm -rf "/run/systemd/nspawn/propagate/$MACHINE_NAME"
    finish "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites ---------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || fail "run as root (debootstrap, systemd-nspawn)"
if ! .venv/bin/python -c 'import licensing, aiohttp' 2>/dev/null; then
    fail "needs the repo venv with the dev extra: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"
fi
if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v systemd-analyze >/dev/null; then
    say "installing systemd-container and debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    aptlog=$(mktemp)
    apt-get install -y -q systemd-container debootstrap >"$aptlog" 2>&1 \
        || { apt-get update -q && apt-get install -y -q systemd-container debootstrap; } >"$aptlog" 2>&1 \
        || { tail -n 20 "$aptlog" >&2; fail "apt-get install systemd-container debootstrap"; }
fi

# --- the unit on its own ---------------------------------------------------------------------------
say "systemd-analyze security --offline=true --threshold=$SECURITY_THRESHOLD"
security=$(systemd-analyze security --offline=true --threshold="$SECURITY_THRESHOLD" \
    "systemd/$UNIT" 2>&1) || {
    echo "$security" >&2
    fail "the unit's exposure is above 4.9 (worse than OK)"
}
say "$(grep -m1 'Overall exposure level' <<<"$security" | sed 's/^[^A-Za-z]*//')"

# --- the pieces: a wheel, the fake upstream, the root file system ----------------------------------
mkdir -p "$CACHE/pip"
WORK=$(mktemp -d "$CACHE/check-systemd.XXXXXX")

say "building the wheel"
mkdir -p "$WORK/src"
cp -r pyproject.toml README.md config.example.yaml license_server "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
.venv/bin/pip wheel --quiet --disable-pip-version-check --no-deps --cache-dir "$CACHE/pip" \
    -w "$WORK/dist" "$WORK/src" >"$WORK/wheel.log" 2>&1 || {
    cat "$WORK/wheel.log" >&2
    fail "pip wheel"
}
wheel=$(find "$WORK/dist" -name 'license_server-*.whl' -print -quit)
[[ -n $wheel ]] || fail "no wheel was built"

say "starting the fake upstream on loopback"
start_fake_upstream "$PRODUCT" "$LICENSE_KEY"
upstream_port=$(<"$WORK/upstream.port")

rootfs_tar=$(ops/rootfs.sh systemd) || fail "ops/rootfs.sh systemd"
say "unpacking $(basename "$rootfs_tar")"
ROOT=$WORK/root
mkdir "$ROOT"
tar --numeric-owner --xattrs --acls -C "$ROOT" -xf "$rootfs_tar"

# What an admin copies to the server: the install script, the unit, the wheel, the README, docs and example.
install -d "$ROOT/root/install/systemd"
cp systemd/install.sh "systemd/$UNIT" "$ROOT/root/install/systemd/"
cp -r README.md docs config.example.yaml "$wheel" "$ROOT/root/install/"
port=$(free_port)
install -d -m 0755 "$ROOT/etc/license-server" "$ROOT/etc/license-server/licenses"
install -m 0644 "$WORK/vendor-public-key.xml" "$ROOT/etc/license-server/vendor-public-key.xml"
cat >"$ROOT/etc/license-server/config.yaml" <<EOF
listen:
  host: 127.0.0.1
  port: $port
upstream:
  url: http://127.0.0.1:$upstream_port
  breaker:
    reset_after: 60s
public_key: /etc/license-server/vendor-public-key.xml
license_files: /etc/license-server/licenses
state_dir: /var/lib/license-server
log:
  format: json
EOF
chmod 0644 "$ROOT/etc/license-server/config.yaml"

# --- boot ------------------------------------------------------------------------------------------
say "booting the container $MACHINE_NAME"
# Not registered with machined and no scope of its own: the host need not run systemd. The host's
# network is shared, so the daemon and the fake upstream meet on 127.0.0.1.
timeout 900 systemd-nspawn --quiet --boot --directory="$ROOT" --machine="$MACHINE_NAME" \
    --register=no --keep-unit --console=read-only --bind="$CACHE/pip:/root/.cache/pip" \
    >"$WORK/console.log" 2>&1 &
NSPAWN_PID=$!  # timeout's, which passes SIGTERM on to systemd-nspawn
# The container's init: the child of nspawn's inner process that is systemd. nspawn forks short-lived
# helpers too, and taking one of them would make every later command inside fail.
find_leader() {
    kill -0 "$NSPAWN_PID" 2>/dev/null || fail "systemd-nspawn exited: $(tail -n 5 "$WORK/console.log")"
    local nspawn pid
    LEADER=
    nspawn=$(pgrep -P "$NSPAWN_PID" -x systemd-nspawn) || return 1
    for pid in $(pgrep -P "$nspawn"); do
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd ]]; then
            LEADER=$pid
            return 0
        fi
    done
    return 1
}
deadline=$((SECONDS + 30))
until find_leader; do
    ((SECONDS < deadline)) || fail "the container's init did not appear within 30s"
    sleep 0.2
done
booted() {
    kill -0 "$LEADER" 2>/dev/null || find_leader || return 1
    [[ $(inside 5 systemctl is-system-running 2>/dev/null) =~ ^(running|degraded)$ ]]
}
# Past systemd's own 90 s job timeout: a unit of the container that waits for something missing ends as
# "degraded" then, which is fine here, instead of this check giving up a moment before.
wait_for 180 "the container booting" booted
say "booted: $(inside 5 systemctl is-system-running || true)"

# --- install, as an admin would --------------------------------------------------------------------
say "systemd/install.sh $(basename "$wheel") (pip install from PyPI into /opt/license-server)"
inside 300 /root/install/systemd/install.sh "/root/install/$(basename "$wheel")" \
    || fail "systemd/install.sh"
inside 30 systemd-analyze verify "/etc/systemd/system/$UNIT" || fail "systemd-analyze verify $UNIT"
say "systemd-analyze verify: clean"
[[ $(inside 10 systemctl is-enabled "$UNIT") == enabled ]] || fail "$UNIT is not enabled"

# --- start: READY=1 ----------------------------------------------------------------------------------
say "systemctl start $UNIT"
inside 90 systemctl start "$UNIT" || fail "systemctl start $UNIT"
[[ $(prop ActiveState) == active ]] || fail "$UNIT is not active after start"
status_text=$(prop StatusText)
[[ -n $status_text ]] || fail "no StatusText: the daemon's READY=1/STATUS= did not arrive"
main_pid=$(prop MainPID)
say "active (READY=1 received), MainPID $main_pid, StatusText '$status_text'"
# shellcheck disable=SC2016  # awk's own $4
nofile=$(inside 5 awk '/Max open files/ {print $4}' "/proc/$main_pid/limits")
say "runs as uid $(inside 5 stat -c %u "/proc/$main_pid") (DynamicUser), open files limit $nofile"

# --- calls through it ------------------------------------------------------------------------------
api=http://127.0.0.1:$port
.venv/bin/python ops/probe.py healthz "$api" --wait 10 || fail "GET /healthz"
.venv/bin/python ops/probe.py activate "$api" --public-key-file "$WORK/vendor-public-key.xml" \
    --product "$PRODUCT" --key "$LICENSE_KEY" --machine "$MACHINE" || fail "activation through the daemon"
inside 5 test -s /var/lib/private/license-server/answers.sqlite3 \
    || fail "no answers.sqlite3 in the StateDirectory (/var/lib/private/license-server)"
say "state written to /var/lib/license-server -> $(inside 5 readlink /var/lib/license-server)"

# --- SIGHUP --------------------------------------------------------------------------------------------
say "systemctl reload $UNIT (SIGHUP)"
inside 30 systemctl reload "$UNIT" || fail "systemctl reload"
sleep 1
[[ $(prop ActiveState) == active && $(prop MainPID) == "$main_pid" ]] \
    || fail "the daemon did not survive SIGHUP"
say "still active, same MainPID"

# --- upgrade: install.sh again restarts the running service -------------------------------------------
say "systemd/install.sh again (an upgrade): the running service restarts"
inside 300 /root/install/systemd/install.sh "/root/install/$(basename "$wheel")" >/dev/null \
    || fail "systemd/install.sh as an upgrade"
[[ $(prop ActiveState) == active && $(prop MainPID) != "$main_pid" ]] \
    || fail "the service was not restarted by the upgrade"
main_pid=$(prop MainPID)
say "restarted by the upgrade: MainPID $main_pid"

# --- SIGKILL: systemd restarts it, and its state survives ----------------------------------------------
restarts=$(prop NRestarts)
say "systemctl kill -s KILL $UNIT"
inside 10 systemctl kill --signal=KILL "$UNIT"
restarted() {
    [[ $(prop NRestarts) -gt $restarts && $(prop ActiveState) == active && $(prop MainPID) != "$main_pid" ]]
}
wait_for 30 "a restart after SIGKILL" restarted
main_pid=$(prop MainPID)
say "restarted: NRestarts $(prop NRestarts), MainPID $main_pid, StatusText '$(prop StatusText)'"
.venv/bin/python ops/probe.py healthz "$api" --wait 10 || fail "GET /healthz after the restart"

say "stopping the fake upstream: the restarted daemon must answer from what it kept"
stop_fake_upstream
.venv/bin/python ops/probe.py activate "$api" --public-key-file "$WORK/vendor-public-key.xml" \
    --product "$PRODUCT" --key "$LICENSE_KEY" --machine "$MACHINE" \
    || fail "activation from kept answers after SIGKILL and restart, with upstream down"

# --- clean stop ------------------------------------------------------------------------------------
invocation=$(prop InvocationID)
say "systemctl stop $UNIT"
inside 60 systemctl stop "$UNIT" || fail "systemctl stop"
[[ $(prop ActiveState) == inactive ]] || fail "$UNIT is $(prop ActiveState) after stop, not inactive"
[[ $(prop Result) == success ]] || fail "stop Result is $(prop Result), not success"
[[ $(prop ExecMainStatus) == 0 ]] || fail "the daemon exited $(prop ExecMainStatus), not 0"
logged_stop() {
    inside 10 journalctl --no-pager -o cat "_SYSTEMD_INVOCATION_ID=$invocation" \
        | grep -qE '"event": ?"stopped"'
}
wait_for 10 "the daemon's \"stopped\" event in the journal" logged_stop
say "stopped: Result=success, exit status 0, \"stopped\" logged"

# --- an admin's commands as root against the service's state ------------------------------------------
inside 30 license-server report machines --config /etc/license-server/config.yaml >"$WORK/machines.txt" \
    || fail "license-server report machines as root"
grep -q "$MACHINE" "$WORK/machines.txt" || fail "report machines does not list $MACHINE: $(cat "$WORK/machines.txt")"
inside 30 license-server audit verify --config /etc/license-server/config.yaml >"$WORK/verify.txt" 2>&1 \
    || fail "audit verify after SIGKILL and restarts: $(cat "$WORK/verify.txt")"
say "as root: report machines lists $MACHINE; audit verify: $(head -n1 "$WORK/verify.txt")"

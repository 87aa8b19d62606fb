#!/usr/bin/env bash
# Install or upgrade license-server as a systemd service, as root, from a checkout or a built wheel:
#
#   systemd/install.sh [--now] [WHEEL|SOURCE_DIR]     (default: the checkout this script is in)
#
# Layout: a venv at /opt/license-server (the unit runs /opt/license-server/bin/license-server),
# /usr/local/bin/license-server linked to it for admins' commands (reports, audit), the unit in
# /etc/systemd/system, settings in /etc/license-server/config.yaml (written from config.example.yaml
# only when missing, with state_dir: /var/lib/license-server), state in /var/lib/license-server (made
# by systemd, owned by the service's transient user).
# The service is enabled; --now also starts it, and an upgrade restarts it if it was running.
# Dependencies come from PyPI, or from wherever pip's PIP_INDEX_URL / PIP_FIND_LINKS point.
set -euo pipefail

PREFIX=/opt/license-server
CONFIG_DIR=/etc/license-server
UNIT=license-server.service

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
now=no
target=

die() { printf 'install: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --now) now=yes ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [[ -z $target ]] || die "one WHEEL or SOURCE_DIR only"; target=$1 ;;
    esac
    shift
done
target=${target:-$here/..}

[[ $(id -u) == 0 ]] || die "run as root"
[[ -e $target ]] || die "$target does not exist"
command -v python3 >/dev/null || die "python3 is missing (Debian: apt-get install python3 python3-venv)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "needs Python 3.11 or newer"
[[ -x /bin/kill ]] || die "/bin/kill is missing, needed by systemctl reload (Debian: apt-get install procps)"
unit_file=$here/$UNIT
[[ -f $unit_file ]] || die "$unit_file is missing"

if [[ ! -x $PREFIX/bin/pip ]]; then
    python3 -m venv --clear "$PREFIX" || die "cannot make a venv (Debian: apt-get install python3-venv)"
fi
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check --upgrade "$target"
"$PREFIX/bin/license-server" --version >/dev/null
ln -sfn "$PREFIX/bin/license-server" /usr/local/bin/license-server

# The README and the docs/ it links to, for the unit's Documentation= and for admins without the checkout.
readme=
if [[ -d $target && -f $target/README.md ]]; then
    readme=$target/README.md
elif [[ -f $here/../README.md ]]; then
    readme=$here/../README.md
fi
[[ -z $readme ]] || install -m 0644 "$readme" "$PREFIX/README.md"
if [[ -n $readme && -d $(dirname "$readme")/docs ]]; then
    install -d -m 0755 "$PREFIX/docs"
    install -m 0644 "$(dirname "$readme")"/docs/*.md "$PREFIX/docs/"
fi

install -d -m 0755 "$CONFIG_DIR"
if [[ ! -e $CONFIG_DIR/config.yaml ]]; then
    example=
    for candidate in "$target/config.example.yaml" "$here/../config.example.yaml"; do
        [[ -f $candidate ]] && { example=$candidate; break; }
    done
    if [[ -n $example ]]; then
        # state_dir spelled out, so that admins' commands (report, audit) find the service's state.
        sed 's|^state_dir: null$|state_dir: /var/lib/license-server|' "$example" >"$CONFIG_DIR/config.yaml"
        chmod 0644 "$CONFIG_DIR/config.yaml"
    else
        printf '# See config.example.yaml in the source for every key.\nstate_dir: /var/lib/license-server\n' \
            >"$CONFIG_DIR/config.yaml"
        chmod 0644 "$CONFIG_DIR/config.yaml"
    fi
fi
# The service runs as a transient user: the settings must be world-readable (keep secrets out of them).
chmod 0644 "$CONFIG_DIR/config.yaml"

LICENSE_SERVER_CONFIG=$CONFIG_DIR/config.yaml STATE_DIRECTORY=/var/lib/license-server \
    "$PREFIX/bin/license-server" check-config >/dev/null \
    || die "$CONFIG_DIR/config.yaml has errors (see above); the service was left as it was"

install -m 0644 "$unit_file" "/etc/systemd/system/$UNIT"
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT"
    if [[ $now == yes ]]; then
        systemctl restart "$UNIT"
    else
        systemctl try-restart "$UNIT"
    fi
else
    systemctl enable --quiet "$UNIT" 2>/dev/null || true
    [[ $now == no ]] || die "systemd is not running here: cannot start $UNIT"
fi
echo "installed $("$PREFIX/bin/license-server" --version) in $PREFIX; settings: $CONFIG_DIR/config.yaml"

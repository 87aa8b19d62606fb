# shellcheck shell=bash
# What the deployment checks under ops/ share; sourced by them, not run. The sourcing script sets CHECK (its
# name, for messages), STARTED ($SECONDS when it began), REPO (the checkout), WORK (its scratch folder, once
# made) and FAKE_PID (empty until it starts the fake upstream).

say() { printf '[%s %3ds] %s\n' "$CHECK" $((SECONDS - STARTED)) "$*"; }
fail() {
    printf '[%s %3ds] FAILED: %s\n' "$CHECK" $((SECONDS - STARTED)) "$*" >&2
    exit 1
}

free_port() {
    "$REPO/.venv/bin/python" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_fake_upstream PRODUCT LICENSE_KEY: the test suite's fake Cryptolens on loopback, one license of 5
# seats; sets FAKE_PID and returns once it listens: its port is then in $WORK/upstream.port, the vendor key
# in $WORK/vendor-public-key.xml.
start_fake_upstream() {
    "$REPO/.venv/bin/python" "$REPO/ops/fake_upstream.py" --ready-file "$WORK/upstream.port" \
        --public-key-file "$WORK/vendor-public-key.xml" --license "$1:$2:5" --lifetime 900 \
        2>"$WORK/upstream.log" &
    FAKE_PID=$!
    local deadline=$((SECONDS + 30))
    until [[ -s $WORK/upstream.port ]]; do
        ((SECONDS < deadline)) || fail "the fake upstream did not start: $(cat "$WORK/upstream.log")"
        sleep 0.2
    done
}

stop_fake_upstream() {
    if [[ -n $FAKE_PID ]]; then
        kill -TERM "$FAKE_PID" 2>/dev/null || true
        wait "$FAKE_PID" 2>/dev/null || true
        FAKE_PID=
    fi
}

# finish STATUS: the end of the cleanup trap: remove the scratch folder, say how the check went, exit.
finish() {
    [[ -z $WORK ]] || rm -rf "$WORK"
    if (($1 == 0)); then
        say "passed in $((SECONDS - STARTED))s"
    else
        say "failed (exit $1)"
    fi
    exit "$1"
}

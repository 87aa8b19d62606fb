"""Workstation-side probes for the deployment checks under ops/; exit 1 with the reason on failure.

probe.py healthz URL [--wait SECONDS]       GET URL/healthz until it answers 200 with JSON
probe.py activate URL --public-key-file F --product N --key K --machine M
                                            Key.activate through the daemon with the real Python SDK,
                                            then the same call as a raw form: 200, JSON, a source header
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TOKEN = "good-token"  # noqa: S105 - the fake upstream's test token


def fail(message: str) -> None:
    print(f"probe: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def healthz(args: argparse.Namespace) -> None:
    url = args.url.rstrip("/") + "/healthz"
    deadline = time.monotonic() + args.wait
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:  # noqa: S310 - a loopback http URL
                body = json.loads(answer.read())
                print(f"probe: {url} -> {answer.status} {json.dumps(body)}")
                return
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            fail(f"{url} did not answer 200 within {args.wait:g}s: {last}")
        time.sleep(0.5)


def activate(args: argparse.Namespace) -> None:
    from licensing.internal import HelperMethods
    from licensing.methods import Helpers, Key

    base = args.url.rstrip("/")
    public_key = args.public_key_file.read_text()
    HelperMethods.server_address = base + "/api/"
    license_key, message = Key.activate(TOKEN, public_key, args.product, args.key, args.machine)[:2]
    if license_key is None:
        fail(f"SDK Key.activate through {base} was refused: {message}")
    if license_key.key != args.key or not Helpers.IsOnRightMachine(
        license_key, custom_machine_code=args.machine
    ):
        fail(f"SDK Key.activate through {base} gave a license for another key or machine")
    print(f"probe: SDK Key.activate through {base}: license {license_key.key} on {args.machine}, signed")

    form = {
        "token": TOKEN,
        "ProductId": str(args.product),
        "Key": args.key,
        "MachineCode": args.machine,
        "Sign": "True",
        "SignMethod": "1",
    }
    request = urllib.request.Request(  # noqa: S310 - a loopback http URL
        base + "/api/key/activate",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            status, source, body = answer.status, answer.headers.get("X-License-Server-Source"), answer.read()
    except urllib.error.HTTPError as exc:
        fail(f"POST {base}/api/key/activate answered {exc.code}: {exc.read()[:300]!r}")
    except OSError as exc:
        fail(f"POST {base}/api/key/activate: {exc}")
    try:
        document = json.loads(body)
    except ValueError:
        fail(f"POST /api/key/activate answered something other than JSON: {body[:300]!r}")
    if status != 200 or document.get("result") != 0 or source is None:
        fail(f"POST /api/key/activate: status {status}, source {source}, body {body[:300]!r}")
    print(f"probe: POST {base}/api/key/activate -> {status}, result 0, X-License-Server-Source: {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    health = sub.add_parser("healthz")
    health.add_argument("url")
    health.add_argument("--wait", type=float, default=0.0)
    act = sub.add_parser("activate")
    act.add_argument("url")
    act.add_argument("--public-key-file", type=Path, required=True)
    act.add_argument("--product", type=int, required=True)
    act.add_argument("--key", required=True)
    act.add_argument("--machine", required=True)
    args = parser.parse_args()
    {"healthz": healthz, "activate": activate}[args.command](args)


if __name__ == "__main__":
    main()

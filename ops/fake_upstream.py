"""Run the test suite's fake Cryptolens service on loopback, for the deployment checks under ops/.

    .venv/bin/python ops/fake_upstream.py --ready-file DIR/ready --public-key-file DIR/vendor.xml \
        --license 3349:AAAAA-BBBBB-CCCCC-DDDDD:5 --lifetime 900

Writes the vendor public key (XML, as the dashboard shows it) and then, once listening, the port to
--ready-file. Accepts the token `good-token`. Stops on SIGTERM/SIGINT or after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from tests.fake_upstream import FakeCryptolens


def _license(text: str) -> tuple[int, str, int]:
    """PRODUCT:KEY[:MAX_MACHINES]."""
    product, key, *rest = text.split(":")
    return int(product), key, int(rest[0]) if rest else 1


async def run(args: argparse.Namespace) -> None:
    fake = FakeCryptolens()
    for product, key, max_machines in args.license:
        fake.add_license(product, key, max_machines=max_machines)
    args.public_key_file.write_text(fake.public_key_xml)
    runner = web.AppRunner(fake.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.lifetime)
    except TimeoutError:
        print("fake upstream: lifetime over, stopping", file=sys.stderr)
    finally:
        await runner.cleanup()
        calls = ", ".join(sorted({call.path for call in fake.calls})) or "none"
        print(f"fake upstream: {len(fake.calls)} calls ({calls})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="fake Cryptolens service on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--public-key-file", type=Path, required=True)
    parser.add_argument("--license", type=_license, action="append", default=[])
    parser.add_argument("--lifetime", type=float, default=900.0, help="seconds before it stops by itself")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""The small servers the benchmark needs, each a process on 127.0.0.1 that stops on SIGTERM.

    python -m bench.servers baseline --port P --answer FILE
        the limit for this stack: aiohttp reading each POST and answering fixed bytes (a 2 KB JSON)
    python -m bench.servers passthrough --port P --upstream URL
        a minimal aiohttp pass-through proxy: one shared ClientSession, the body and Content-Type both ways
    python -m bench.servers upstream --port P --answers FILE
        a fast fake Cryptolens: serves answers signed once at setup, looked up by product and key

All use the stdlib asyncio event loop, as the daemon does, and stop by themselves after --lifetime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

JSON = "application/json; charset=utf-8"
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_NOT_FOUND = b'{"result":1,"message":"Could not find the key."}'


def baseline_app(answer: bytes) -> web.Application:
    """Reads the request body and answers the same bytes to every request."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, headers={"Content-Type": JSON})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def passthrough_app(upstream: str, connections: int) -> web.Application:
    """Forwards each request's method, path, query and body upstream, and its answer back."""

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as shared:
            app[_SESSION] = shared
            yield

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/x-www-form-urlencoded")}
        url = upstream + request.rel_url.raw_path_qs
        async with request.app[_SESSION].request(request.method, url, data=body, headers=headers) as answer:
            data = await answer.read()
            content_type = answer.headers.get("Content-Type", JSON)
        return web.Response(status=answer.status, body=data, headers={"Content-Type": content_type})

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def upstream_app(answers: dict[str, bytes]) -> web.Application:
    """Answers a form naming ProductId and key with the answer signed for that license at setup."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        fields = {name.lower(): value for name, value in parse_qsl(body.decode(), keep_blank_values=True)}
        answer = answers.get(f"{fields.get('productid', '')}/{fields.get('key', '')}", _NOT_FOUND)
        return web.Response(body=answer, headers={"Content-Type": JSON})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(app: web.Application, port: int, lifetime: float) -> None:
    """Serve on 127.0.0.1:port until SIGTERM or SIGINT, or until `lifetime` seconds have passed."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), lifetime)
    except TimeoutError:
        pass
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse the command line and run one server."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("baseline", "passthrough", "upstream"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", type=Path, help="baseline: the file whose bytes every answer is")
    parser.add_argument("--upstream", help="passthrough: origin to forward to, e.g. http://127.0.0.1:9000")
    parser.add_argument(
        "--connections", type=int, default=32, help="passthrough: pooled upstream connections"
    )
    parser.add_argument("--answers", type=Path, help='upstream: JSON {"product/key": signed answer}')
    parser.add_argument("--lifetime", type=float, default=1800.0, help="stop after this many seconds")
    args = parser.parse_args()
    if args.kind == "baseline":
        app = baseline_app(args.answer.read_bytes())
    elif args.kind == "passthrough":
        app = passthrough_app(args.upstream, args.connections)
    else:
        table = json.loads(args.answers.read_text())
        app = upstream_app({name: body.encode() for name, body in table.items()})
    asyncio.run(serve(app, args.port, args.lifetime))


if __name__ == "__main__":
    main()

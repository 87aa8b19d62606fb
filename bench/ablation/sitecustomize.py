"""Loaded by the daemon only under `bench/ablate.py`: replaces the parts named in BENCH_ABLATE with no-ops.

A measuring aid, never a way to run the daemon: each part it removes is a promise of the product.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from typing import Any

_OFF = frozenset(filter(None, os.environ.get("BENCH_ABLATE", "").split(",")))

if "audit" in _OFF:
    from license_server.audit import writer

    async def _no_append(_self: Any, _record: Mapping[str, Any]) -> None:
        return None

    writer.AuditLog.append = _no_append  # type: ignore[method-assign]
if "log" in _OFF:
    from license_server import logs

    logs.Logging._json_call_line = lambda _self, *_args: None  # type: ignore[method-assign]
if "seats" in _OFF:
    from license_server.storage import seats

    seats.SeatLedger.seen = lambda _self, *_args, **_kwargs: None  # type: ignore[method-assign]
if "metrics" in _OFF:
    from license_server.web import metrics

    metrics.Metrics.count_call = lambda _self, *_args: None  # type: ignore[method-assign]
    metrics.Metrics.count_upstream = lambda _self, *_args: None  # type: ignore[method-assign]
if "gc" in _OFF:
    gc.disable()

"""The single egress to the licensing service: pooled session, timeouts, breaker, retry budget, coalescing."""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import aiohttp
import structlog
from yarl import URL

from license_server import __version__
from license_server.config import BreakerConfig, RetryConfig, UpstreamConfig
from license_server.licensing.protocol import Answer, Forward, parse_answer

log = structlog.get_logger(__name__)

_READ_CHUNK = 64 * 1024
# API methods that only read: sending one twice changes nothing upstream.
_IDEMPOTENT = frozenset({"key/getkey", "data/listdataobjects", "message/getmessages"})
# Failures of an idempotent call that another try may not repeat; the others would come back the same.
_RETRYABLE = frozenset({"unreachable", "timeout", "http_5xx"})
_RETRY_WINDOW = 10  # seconds of recent calls the retry budget is measured against
_RETRY_JITTER = 0.025  # longest pause before a retry, in seconds, so that retries do not arrive in step

T = TypeVar("T")


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x on the hot path; never changed
class UpstreamAnswer:
    """What upstream sent back: status, body bytes, content type and the parsed outline if it is JSON."""

    status: int
    body: bytes
    content_type: str
    answer: Answer | None
    latency: float
    retried: bool = False  # the answer to a second try
    sent: float = 0.0  # time.monotonic() when the request that got it went out


class UpstreamFailure(Exception):
    """Upstream could not give a usable answer; `status` is what the workstation gets if nothing is kept."""

    def __init__(
        self, reason: str, *, kind: str, status: int = 502, upstream_status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a short word for metrics: timeout, unreachable, tls, http_5xx, invalid, ...
        self.status = status
        self.upstream_status = upstream_status
        self.retried = False  # the failure of a second try


class BreakerState(Enum):
    """Where the circuit breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Stops calling an upstream that keeps failing, and lets one probe through now and then."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._delay = config.reset_after
        self._open_until = 0.0
        self.last_success: float | None = None  # wall-clock time, for status pages
        self.last_failure: str | None = None
        # wall-clock time upstream last went down or came back (or the daemon started), for status pages
        self.changed_at = time.time()

    def allow(self) -> bool:
        """Whether a call may go upstream now; an open breaker lets one probe through once its delay is up."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self._clock() >= self._open_until:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def succeeded(self) -> None:
        """Record a usable answer: close the breaker."""
        if self.state is not BreakerState.CLOSED:
            log.info("upstream_recovered")
            self.changed_at = time.time()
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._delay = self._config.reset_after
        self.last_success = time.time()

    def failed(self, reason: str) -> None:
        """Record a failure; enough of them in a row, or a failed probe, open the breaker."""
        self.last_failure = reason
        if self.state is BreakerState.HALF_OPEN:
            self._delay = min(self._delay * 2, self._config.max_reset_after)
            self._open(reason)
            return
        self._failures += 1
        if self.state is BreakerState.CLOSED and self._failures >= self._config.failures:
            self._open(reason)

    def abandoned(self) -> None:
        """A probe ended with no verdict (the workstation went away): let the next call probe."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN
            self._open_until = self._clock()

    def _open(self, reason: str) -> None:
        if self.state is BreakerState.CLOSED:
            self.changed_at = time.time()
        self.state = BreakerState.OPEN
        self._open_until = self._clock() + self._delay
        log.warning("upstream_down", reason=reason, retry_in_s=round(self._delay, 3))

    @property
    def retry_in(self) -> float:
        """Seconds until the next probe is allowed (0 when closed)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._open_until - self._clock())


class RetryBudget:
    """Allows retries only up to a share of recent upstream calls plus a small floor, as Finagle's budget."""

    def __init__(self, config: RetryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._ratio = config.budget_percent / 100
        self._floor = config.min_per_second * _RETRY_WINDOW
        self._clock = clock
        self._second = int(clock())
        # calls and retries per second over the last _RETRY_WINDOW seconds, the current second last
        self._calls: deque[int] = deque([0] * _RETRY_WINDOW, maxlen=_RETRY_WINDOW)
        self._retries: deque[int] = deque([0] * _RETRY_WINDOW, maxlen=_RETRY_WINDOW)

    def _roll(self) -> None:
        now = int(self._clock())
        for _ in range(min(now - self._second, _RETRY_WINDOW)):
            self._calls.append(0)
            self._retries.append(0)
        self._second = now

    def called(self) -> None:
        """Count a call that goes upstream: each one adds a share of a retry to the budget."""
        self._roll()
        self._calls[-1] += 1

    def withdraw(self) -> bool:
        """Take one retry from the budget; False when recent retries have used it up."""
        self._roll()
        if sum(self._retries) + 1 > self._ratio * sum(self._calls) + self._floor:
            return False
        self._retries[-1] += 1
        return True


def _never_sent(failure: UpstreamFailure) -> bool:
    """Whether a call failed before any byte of it left: refused, not resolved, connect timeout."""
    cause = failure.__cause__
    if isinstance(cause, aiohttp.ClientSSLError):
        return False  # a certificate that does not verify will not verify on a second try either
    return isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def make_ssl_context(config: UpstreamConfig) -> ssl.SSLContext:
    """TLS for the upstream: system trust store plus an optional extra CA file, verification always on."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    """The one long-lived client session every upstream call shares."""
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        ssl=make_ssl_context(config),
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=config.timeout, connect=config.connect_timeout),
        trust_env=False,  # proxies come only from upstream.proxy, never from the environment
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": f"license-server/{__version__}", "Accept": "application/json"},
        raise_for_status=False,
        auto_decompress=True,
    )


class Upstream:
    """Sends allowlisted calls to the one configured origin and classifies what comes back."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        breaker: Breaker,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.breaker = breaker
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget(config.retry)
        self._base = config.url.rstrip("/") + "/api/"
        # coalesced calls share the answer and its verdict (the judge of the first caller, same cache key)
        self._inflight: dict[bytes, asyncio.Future[tuple[UpstreamAnswer, Any]]] = {}

    def url_for(self, method: str, raw_query: str) -> URL:
        """The upstream URL of an API method: built from configuration only, never from the request."""
        # The query was checked to be a well-formed form, so it goes on exactly as the workstation wrote it.
        return URL(f"{self._base}{method}" + (f"?{raw_query}" if raw_query else ""), encoded=True)

    async def call(
        self,
        forward: Forward,
        *,
        judge: Callable[[UpstreamAnswer], T],
        coalesce_key: bytes | None = None,
    ) -> tuple[UpstreamAnswer, T]:
        """Forward one call and judge its answer; identical calls under one coalesce key share both.

        `judge` decides whether an answer is usable (it raises UpstreamFailure for one that is not, e.g. a
        signature that does not verify) and returns what it found; the breaker, the retry decision and the
        caller's metrics all take its word, so every way upstream can fail counts the same.
        """
        if coalesce_key is None:
            return await self._guarded(forward, judge)
        if (shared := self._inflight.get(coalesce_key)) is not None:
            return await asyncio.shield(shared)  # the same call: the first caller's judge's verdict
        task = asyncio.ensure_future(self._guarded(forward, judge))
        self._inflight[coalesce_key] = task
        task.add_done_callback(lambda _: self._inflight.pop(coalesce_key, None))
        # Shielded so that the first caller going away does not cancel the call the others wait for.
        return await asyncio.shield(task)

    async def _guarded(
        self, forward: Forward, judge: Callable[[UpstreamAnswer], T]
    ) -> tuple[UpstreamAnswer, T]:
        """One call through the breaker, tried once more if it never left or only reads, budget allowing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout  # a retry never makes the workstation wait longer
        if not self.breaker.allow():
            raise UpstreamFailure(
                f"the licensing service is marked down after repeated failures ({self.breaker.last_failure});"
                f" next check in {self.breaker.retry_in:.0f} s",
                kind="breaker_open",
                status=503,
            )
        self.retry_budget.called()
        send = functools.partial(self._send, forward)
        try:
            return await self._attempt(send, judge, None)
        except UpstreamFailure as failure:
            if not (_never_sent(failure) or (forward.method in _IDEMPOTENT and failure.kind in _RETRYABLE)):
                raise  # it may have reached upstream, and repeating it could change state twice
            pause = random.uniform(0, _RETRY_JITTER)  # noqa: S311 (spreading retries, not a secret)
            if loop.time() + pause >= deadline or not self.retry_budget.withdraw():
                raise
            await asyncio.sleep(pause)
            if not self.breaker.allow():  # the failure may have opened it: a retry is no way around it
                raise
        try:
            answer, verdict = await self._attempt(send, judge, deadline)
        except UpstreamFailure as failure:
            failure.retried = True
            raise
        answer.retried = True
        return answer, verdict

    async def _attempt(
        self,
        send: Callable[[], Awaitable[UpstreamAnswer]],
        judge: Callable[[UpstreamAnswer], T],
        deadline: float | None,
    ) -> tuple[UpstreamAnswer, T]:
        """Send once, by `deadline` (loop time) if given, judge the answer, tell the breaker how it went."""
        try:
            if deadline is None:
                answer = await send()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        answer = await send()
                except TimeoutError as exc:  # _send turns its own timeouts into failures: this is ours
                    raise UpstreamFailure(
                        f"no answer from the licensing service within {self.config.timeout:g} s",
                        kind="timeout",
                        status=504,
                    ) from exc
            verdict = judge(answer)  # a forged or unusable answer is a failure like any other
        except UpstreamFailure as failure:
            self.breaker.failed(failure.reason)
            raise
        except BaseException:
            self.breaker.abandoned()  # cancelled: no verdict, and the breaker must not stay half-open
            raise
        self.breaker.succeeded()
        return answer, verdict

    async def _send(self, forward: Forward) -> UpstreamAnswer:
        post = forward.http_method == "POST"
        headers = {"Content-Type": forward.content_type} if post and forward.content_type else {}
        url = self.url_for(forward.method, forward.raw_query)
        started = time.monotonic()
        try:
            async with self.session.request(
                forward.http_method,
                url,
                data=forward.body if post else None,
                headers=headers,
                allow_redirects=False,
                proxy=self.config.proxy,
            ) as response:
                data = await self._read_limited(response)
                status = response.status
                answer_type = response.headers.get("Content-Type", "application/json")
        except TimeoutError as exc:
            raise UpstreamFailure(
                f"no answer from the licensing service within {self.config.timeout:g} s",
                kind="timeout",
                status=504,
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamFailure(
                f"TLS verification of the licensing service failed: {exc}", kind="tls"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(
                f"the licensing service could not be reached: {_describe(exc)}", kind="unreachable"
            ) from exc
        latency = time.monotonic() - started
        if 300 <= status < 400:
            raise UpstreamFailure(
                f"the licensing service answered a redirect ({status}), which is not followed",
                kind="redirect",
                upstream_status=status,
            )
        if status >= 500:
            raise UpstreamFailure(
                f"the licensing service failed with HTTP {status}", kind="http_5xx", upstream_status=status
            )
        parsed = parse_answer(data)
        if parsed is None:
            raise UpstreamFailure(
                f"the licensing service sent an answer that is not a licensing answer (HTTP {status})",
                kind="invalid",
                upstream_status=status,
            )
        return UpstreamAnswer(
            status=status, body=data, content_type=answer_type, answer=parsed, latency=latency, sent=started
        )

    async def _read_limited(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_answer_bytes
        # An answer announcing more is refused from its headers, before its body costs time; a compressed
        # one is judged by what it inflates to, counted below.
        if "Content-Encoding" not in response.headers and (response.content_length or 0) > limit:
            raise UpstreamFailure(
                f"the licensing service announced an answer larger than {limit} bytes", kind="too_large"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise UpstreamFailure(
                    f"the licensing service sent an answer larger than {limit} bytes", kind="too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _describe(exc: aiohttp.ClientError) -> str:
    """A short, token-free description of a client error for logs and messages."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection to {exc.host}:{exc.port} failed ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed before an answer arrived"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off"
    return type(exc).__name__

"""Break the daemon on purpose, one promise at a time, and check that the tests guarding it fail.

    .venv/bin/python ops/break_on_purpose.py            # every sabotage (about 10 minutes)
    .venv/bin/python ops/break_on_purpose.py --only tls  # those whose name contains "tls"

Each sabotage is one exact text replacement in license_server/, applied to a scratch copy of the working
tree (never to the tree itself); the named tests run there and must fail. A sabotage whose tests still pass
means the suite no longer guards that promise: the script lists it and exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Sabotage:
    """One promise, the one-line change that breaks it, and the tests that must then fail."""

    name: str
    file: str
    original: str
    broken: str
    tests: tuple[str, ...]


FAULTS = "tests/test_faults.py"
FUZZ = "tests/test_fuzz.py"
HOSTILE = "tests/test_hostile.py"
STORMS = "tests/test_storms.py"
REPORTS = "tests/test_reports.py"
SLOW = "tests/test_slowloris.py::TestSlowloris"

SABOTAGES = (
    # -- upstream faults ---------------------------------------------------------------------------
    Sabotage(
        "answer size limit",
        "license_server/licensing/upstream.py",
        "if size > limit:",
        "if size > limit * 64:",
        (f"{FAULTS}::TestLimits::test_endless_chunked_cut",),
    ),
    Sabotage(
        "announced size refused from headers",
        "license_server/licensing/upstream.py",
        '"Content-Encoding" not in response.headers and',
        '"Content-Encoding" in response.headers and',
        (f"{FAULTS}::TestLimits::test_huge_content_length_refused_from_headers",),
    ),
    Sabotage(
        "redirects not followed",
        "license_server/licensing/upstream.py",
        "allow_redirects=False,",
        "allow_redirects=True,",
        (f"{FAULTS}::TestRedirects",),
    ),
    Sabotage(
        "tls verified",
        "license_server/licensing/upstream.py",
        "ssl=make_ssl_context(config),",
        "ssl=False,",
        (f"{FAULTS}::TestTlsFaults",),
    ),
    Sabotage(
        "5xx is a failure",
        "license_server/licensing/upstream.py",
        "if status >= 500:",
        "if status >= 504:",
        (f"{FAULTS}::TestFaultClasses::test_kept_answer_rides_out",),
    ),
    Sabotage(
        "forged signature never kept or served",
        "license_server/licensing/policy.py",
        "if not verify_signed(self.keyring, signed):",
        "if verify_signed(self.keyring, signed) is None:",
        (f"{FAULTS}::TestFaultClasses::test_kept_answer_rides_out",),
    ),
    # -- hostile input -----------------------------------------------------------------------------
    Sabotage(
        "parser refusals are JSON",
        "license_server/web/listener.py",
        "connection = make_connection(self._server, json_error)",
        "connection = self._server()",
        (f"{HOSTILE}::TestParser::test_smuggling_refused",),
    ),
    Sabotage(
        "parser refusals never quote the request",
        "license_server/web/listener.py",
        "        text = parse_refusal(exc, max_line)",
        "        text = exc.message",
        (f"{FUZZ}::TestHttp::test_token_not_echoed",),
    ),
    Sabotage(
        "parser refusals close the connection",
        "license_server/web/listener.py",
        'response.headers["Connection"] = "close"',
        'response.headers["Connection"] = "keep-alive"',
        (f"{HOSTILE}::TestParser::test_smuggling_refused",),
    ),
    Sabotage(
        "stalled bodies bounded",
        "license_server/web/handlers.py",
        "async with asyncio.timeout(deadline):",
        "async with asyncio.timeout(None):",
        (f"{HOSTILE}::TestStalledBodies",),
    ),
    Sabotage(
        "only /api/controller/method paths",
        "license_server/licensing/protocol.py",
        'if len(parts) != 3 or parts[0].lower() != "api":',
        'if len(parts) < 3 or parts[0].lower() != "api":',
        (f"{FUZZ}::TestPaths::test_refused_spellings",),
    ),
    Sabotage(
        "ASCII-only method names",
        "license_server/licensing/protocol.py",
        "if not (controller.isascii() and controller.isalnum() and method.isascii() and method.isalnum()):",
        "if not (controller.isalnum() and method.isalnum()):",
        (f"{FUZZ}::TestPaths::test_refused_spellings",),
    ),
    Sabotage(
        "a field given twice refused",
        "license_server/licensing/protocol.py",
        "            if lowered in fields:",
        "            if name in fields:",
        (f"{FUZZ}::TestForms::test_duplicate_refused",),
    ),
    Sabotage(
        "separators refused in fields",
        "license_server/licensing/protocol.py",
        'if decoded and ("\\x00" in name',
        'if False and ("\\x00" in name',
        (f"{FUZZ}::TestCacheKeys::test_separator_in_value_refused",),
    ),
    Sabotage(
        "signing options in the cache key",
        "license_server/licensing/protocol.py",
        "            if name in _FIELDS_NOT_IN_KEY:",
        '            if name in _FIELDS_NOT_IN_KEY or name == "signmethod":',
        (f"{FUZZ}::TestCacheKeys::test_answer_field_changes_key",),
    ),
    Sabotage(
        "token in the cache key",
        "license_server/licensing/protocol.py",
        'fingerprints(fields.get("token", ""))',
        'fingerprints("")',
        (f"{FUZZ}::TestCacheKeys::test_token_in_key_but_never_in_clear",),
    ),
    Sabotage(
        "cache keys stable across versions",
        "license_server/licensing/protocol.py",
        'parts.append(f"\\x00{name}\\x01{value}")',
        'parts.append(f"\\x01{name}\\x00{value}")',
        ("tests/test_protocol.py::TestCacheKeys::test_stable_across_versions",),
    ),
    Sabotage(
        "license files verified",
        "license_server/licensing/license_files.py",
        "    if not verify_signed(keyring, signed):",
        "    if verify_signed(keyring, signed) is None:",
        (f"{FUZZ}::TestLicenseFiles::test_changed_payload_rejected",),
    ),
    Sabotage(
        "signatures checked",
        "license_server/licensing/signatures.py",
        "    return keyring.verify(signed.payload, signed.signature)",
        "    return keyring.verify(signed.payload, signed.signature) or len(signed.payload) > 0",
        (f"{FUZZ}::TestSignatures::test_bit_flip_rejected",),
    ),
    Sabotage(
        "over-long signatures refused",
        "license_server/licensing/signatures.py",
        "    if not signature or value >= modulus:",
        "    if not signature:",
        (f"{FUZZ}::TestSignatures::test_longer_signature_rejected",),
    ),
    # -- storms: retries, breaker, coalescing, offline --------------------------------------------
    Sabotage(
        "activate never repeated",
        "license_server/licensing/upstream.py",
        "if not (_never_sent(failure) or (forward.method in _IDEMPOTENT and failure.kind in _RETRYABLE)):",
        "if not (_never_sent(failure) or failure.kind in _RETRYABLE):",
        (f"{STORMS}::TestRetryBudget::test_state_changing_call_reaches_upstream_once",),
    ),
    Sabotage(
        "retries within the budget",
        "license_server/licensing/upstream.py",
        "if sum(self._retries) + 1 > self._ratio * sum(self._calls) + self._floor:",
        "if sum(self._retries) + 1 > 2 * sum(self._calls) + self._floor:",
        (f"{STORMS}::TestRetryBudget::test_flood_of_failing_get_key_within_budget",),
    ),
    Sabotage(
        "retries never past the breaker",
        "license_server/licensing/upstream.py",
        "if not self.breaker.allow():  # the failure may have opened it",
        "if False:  # the failure may have opened it",
        (f"{STORMS}::TestRetryBudget::test_retry_does_not_bypass_breaker",),
    ),
    Sabotage(
        "retries within the call's timeout",
        "license_server/licensing/upstream.py",
        "deadline = loop.time() + self.config.timeout",
        "deadline = loop.time() + 2 * self.config.timeout",
        (f"{STORMS}::TestRetryBudget::test_retry_stays_within_call_timeout",),
    ),
    Sabotage(
        "identical GetKeys coalesced",
        "license_server/licensing/upstream.py",
        "self._inflight[coalesce_key] = task",
        'self._inflight[coalesce_key + b"-"] = task',
        (f"{STORMS}::TestCoalescing::test_500_identical_get_keys_one_upstream_call",),
    ),
    Sabotage(
        "offline makes no connection",
        "license_server/web/app.py",
        "if config.upstream.offline:",
        "if config.upstream.offline and False:",
        (f"{STORMS}::TestOfflineTripwire::test_offline_never_looks_up_or_connects",),
    ),
    Sabotage(
        "breaker backs off",
        "license_server/licensing/upstream.py",
        "self._delay = min(self._delay * 2, self._config.max_reset_after)",
        "self._delay = min(self._delay * 1, self._config.max_reset_after)",
        (f"{STORMS}::TestBreakerUnderLoad::test_refused_for_a_minute",),
    ),
    Sabotage(
        "every call audited during an outage",
        "license_server/web/handlers.py",
        "await services.audit.append(_record(request, request_id, method, call, outcome, elapsed))",
        "await services.audit.append(_record(request, request_id, method, call, outcome, elapsed))"
        " if outcome.age is None else None",
        (f"{STORMS}::TestOutageMinute::test_minute_of_500s_with_200_workstations",),
    ),
    # -- seat reports -------------------------------------------------------------------------------
    Sabotage(
        "node-locked machines told from floating ones",
        "license_server/storage/seats.py",
        "floating = 0 AS node_locked",
        "floating = 1 AS node_locked",
        (f"{REPORTS}::test_node_locked_and_distinct_machines",),
    ),
    Sabotage(
        "machines counted once per bucket",
        "license_server/storage/seats.py",
        '"SELECT bucket, count(DISTINCT machine_code),"',
        '"SELECT bucket, count(machine_code),"',
        (f"{REPORTS}::test_a_machine_that_called_with_and_without_a_seat_counts_once_as_node_locked",),
    ),
    Sabotage(
        "calls in the right bucket",
        "license_server/storage/seats.py",
        "(hour - :origin + :size) / :size - 1 AS bucket",
        "(hour - :origin + :size) / :size AS bucket",
        (f"{REPORTS}::test_the_benchmark_ledger_matches_a_plain_computation",),
    ),
    Sabotage(
        "the range's end is exclusive",
        "license_server/storage/seats.py",
        "AND hour >= :hour AND hour < :until",
        "AND hour >= :hour AND hour <= :until",
        (f"{REPORTS}::test_activity_in_the_hour_that_starts_at_until_does_not_count",),
    ),
    # -- slow clients and crashes ---------------------------------------------------------------------
    Sabotage(
        "header deadline",
        "license_server/web/listener.py",
        "asyncio.get_running_loop().call_later(self.header_timeout, self._check, connection)",
        "asyncio.get_running_loop().call_later(self.header_timeout * 100, self._check, connection)",
        (f"{SLOW}::test_header_deadline_at_scale",),
    ),
    Sabotage(
        "connection cap",
        "license_server/web/listener.py",
        "if open_connections(self._server) >= self.max_connections:",
        "if open_connections(self._server) >= self.max_connections * 2:",
        (f"{SLOW}::test_connection_cap_at_scale",),
    ),
    Sabotage(
        "idle keep-alive connections closed",
        "license_server/daemon.py",
        "keepalive_timeout=config.listen.keepalive_timeout,",
        "keepalive_timeout=config.listen.keepalive_timeout * 100,",
        (f"{SLOW}::test_idle_keepalive_closed",),
    ),
    # -- reloads ------------------------------------------------------------------------------------------
    Sabotage(
        "reload keeps restart-only settings",
        "license_server/config.py",
        "            held = _replaced_at(held, path, before)",
        "            held = held",
        ("tests/test_reload.py::TestRestartOnly",),
    ),
    Sabotage(
        "reload renews the TLS certificate",
        "license_server/web/listener.py",
        "            connection.context = self._in_use",
        "            pass",
        ("tests/test_reload.py::TestServerTls",),
    ),
    Sabotage(
        "audit record written before the answer",
        "license_server/audit/writer.py",
        "        await asyncio.shield(batch.done)",
        "        await asyncio.sleep(0)\n        return",
        ("tests/test_process.py::TestKillUnderLoad::test_no_answered_call_lost",),
    ),
    # -- private state ------------------------------------------------------------------------------------
    Sabotage(
        "private state: databases created 0600",
        "license_server/storage/sqlite.py",
        "        create_private(self.path)  # SQLite creates",
        "        private_folder(self.path.parent)  # SQLite creates",
        ("tests/test_state_files.py::TestPrivateState",),
    ),
    Sabotage(
        "private state: open folders warned",
        "license_server/storage/state.py",
        "    if mode & 0o077:",
        "    if mode & 0o007:",
        ("tests/test_state_files.py::TestOpenStateWarned",),
    ),
    # -- text workstations choose, in charts, CSV and JSON; check-config ------------------------------
    Sabotage(
        "chart labels drawn as plain text",
        "license_server/reports/charts.py",
        '"text.parse_math": False}',
        '"text.parse_math": True}',
        (
            "tests/test_hostile_text.py::TestCharts::test_a_mathtext_key_is_drawn_as_itself",
            "tests/test_hostile_text.py::TestConsoleChart::test_a_mathtext_key_gives_a_chart_not_a_500",
        ),
    ),
    Sabotage(
        "a console chart that cannot be drawn is no 500",
        "license_server/admin/pages.py",
        "    except Exception:  # a picture on a page",
        "    except ArithmeticError:  # a picture on a page",
        (
            "tests/test_hostile_text.py::TestConsoleChart::test_a_chart_that_cannot_be_drawn_is_logged_and_says_so",
        ),
    ),
    Sabotage(
        "CSV cells never start a formula",
        "license_server/reports/tables.py",
        "if text.startswith(_FORMULA_STARTS):",
        "if text.startswith(()):",
        ("tests/test_hostile_text.py::TestCsv",),
    ),
    Sabotage(
        "JSON output escapes unprintable characters",
        "license_server/reports/tables.py",
        '    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)',
        "    return text",
        ("tests/test_hostile_text.py::TestJson",),
    ),
    Sabotage(
        "check-config fails on license files",
        "license_server/cli.py",
        "    if problems:\n        return 2",
        '    if any(p.startswith("public_key") for p in problems):\n        return 2',
        ("tests/test_config.py::TestCheckConfig",),
    ),
    Sabotage(
        "only licensed activations are machines",
        "license_server/licensing/policy.py",
        "if outcome.licensed and call.kind is Kind.ACTIVATE and",
        "if call.kind is Kind.ACTIVATE and",
        ("tests/test_seats.py::TestOnlyLicensedMachines",),
    ),
    Sabotage(
        "a deactivation drops kept GetKey answers listing the machine",
        "license_server/licensing/cache.py",
        "    return signed is None or signed.matches_machine(machine_code)",
        "    return signed is None",
        ("tests/test_kept_answers.py::TestFreedMachineNotRevived",),
    ),
    Sabotage(
        "forged answers are failures for the breaker",
        "license_server/licensing/upstream.py",
        "            verdict = judge(answer)  # a forged or unusable answer is a failure like any other\n"
        "        except UpstreamFailure as failure:\n"
        "            self.breaker.failed(failure.reason)\n"
        "            raise\n"
        "        except BaseException:\n"
        "            self.breaker.abandoned()  # cancelled: no verdict,"
        " and the breaker must not stay half-open\n"
        "            raise\n"
        "        self.breaker.succeeded()\n",
        "        except UpstreamFailure as failure:\n"
        "            self.breaker.failed(failure.reason)\n"
        "            raise\n"
        "        except BaseException:\n"
        "            self.breaker.abandoned()\n"
        "            raise\n"
        "        self.breaker.succeeded()\n"
        "        verdict = judge(answer)\n",
        (f"{FAULTS}::TestForgedAnswers",),
    ),
    # -- the call the daemon reads is the call upstream gets -------------------------------------------
    Sabotage(
        "a GET's body never becomes fields",
        "license_server/web/handlers.py",
        'if body and request.method == "GET":',
        'if body and request.method == "HEAD":',
        ("tests/test_proxy.py::TestRefusedInput::test_get_with_body_refused",),
    ),
    Sabotage(
        "kept and recorded values bounded",
        "license_server/licensing/protocol.py",
        'if len(value := fields.get(name, "")) > limit:',
        'if len(value := fields.get(name, "")) > limit * 100:',
        (
            "tests/test_protocol.py::TestFieldLimits::test_longer_refused",
            f"{HOSTILE}::TestOversizedValues",
        ),
    ),
    Sabotage(
        "cache key made of values exactly as sent",
        "license_server/licensing/protocol.py",
        "            value = fields[name]\n",
        "            value = fields[name].strip()\n",
        (
            "tests/test_protocol.py::TestCacheKeys::test_surrounding_whitespace_is_another_key",
            "tests/test_proxy.py::TestExactValues",
        ),
    ),
    # -- the admin console's door ---------------------------------------------------------------------
    Sabotage(
        "wrong admin tokens make their address wait",
        "license_server/admin/throttle.py",
        "if entry.count >= FREE_FAILURES:",
        "if entry.count >= FREE_FAILURES * 1000:",
        (
            "tests/test_admin_auth.py::TestThrottle::test_wrong_logins_make_the_address_wait",
            "tests/test_admin_auth.py::TestThrottle::test_wrong_bearer_tokens_are_recorded_counted_and_slowed",
        ),
    ),
    Sabotage(
        "the throttle's address table is bounded",
        "license_server/admin/throttle.py",
        "if len(self._failures) >= self._max and not",
        "if len(self._failures) >= self._max * 10 and not",
        ("tests/test_admin_auth.py::TestThrottle::test_the_address_table_is_bounded",),
    ),
    Sabotage(
        "rotating addresses past a full throttle table wins no guesses",
        "license_server/admin/throttle.py",
        "entry.count = FREE_FAILURES - 1",
        "entry.count = 0",
        (
            "tests/test_admin_auth.py::TestThrottle::test_rotating_addresses_past_a_full_table_wins_no_guesses",
        ),
    ),
    Sabotage(
        "a flood of wrong tokens cannot fill the audit trail",
        "license_server/admin/throttle.py",
        "if self._tokens < 1:",
        "if self._tokens < -1e9:",
        ("tests/test_admin_auth.py::TestThrottle::test_a_flood_cannot_fill_the_trail",),
    ),
    Sabotage(
        "a guessable admin token is refused",
        "license_server/admin/credentials.py",
        "if len(text) < MIN_TOKEN_CHARS:",
        "if len(text) < 1:",
        ("tests/test_admin_auth.py::TestWeakSecrets::test_guessable_admin_token_is_refused",),
    ),
    Sabotage(
        "a token file others may read is refused",
        "license_server/admin/credentials.py",
        "    if mode & forbidden:\n",
        "    if mode & forbidden & 0:\n",
        (
            "tests/test_admin_auth.py::TestWeakSecrets::test_token_file_open_to_group_or_others_is_refused",
            "tests/test_admin_auth.py::TestWeakSecrets::test_systemd_credentials_are_judged_as_systemd_makes_them",
        ),
    ),
    Sabotage(
        "the page after login is what was checked",
        "license_server/admin/auth.py",
        "    if not target.isprintable():\n",
        "    if not target.isprintable() and False:\n",
        ("tests/test_admin_auth.py::TestLoginTarget::test_control_characters_lead_home",),
    ),
    Sabotage(
        "the login cookie is Secure behind a TLS proxy",
        "license_server/admin/auth.py",
        "session_lifetime),\n        secure=secure_cookie(request),",
        "session_lifetime),\n        secure=request.secure,",
        ("tests/test_admin_auth.py::TestSecureCookie::test_cookie_is_secure_as_configured",),
    ),
    Sabotage(
        "answers signed before a deactivation are not kept",
        "license_server/licensing/policy.py",
        "elif answered.sent <= self._freed.get(call.license, -1.0):",
        "elif answered.sent < 0:",
        (
            "tests/test_kept_answers.py::TestFreedMachineNotRevived::test_get_key_signed_before_a_deactivation_not_kept",
        ),
    ),
    Sabotage(
        "product ids compared as numbers",
        "license_server/licensing/policy.py",
        "return int(call.product_id) == signed",
        "return call.product_id == str(signed)",
        ("tests/test_proxy.py::TestExactValues::test_product_id_read_as_a_number",),
    ),
    # -- several nodes on PostgreSQL ---------------------------------------------------------------------
    Sabotage(
        "a seat granted during an outage locks its license's row",
        "license_server/storage/pg_seats.py",
        "WHERE product_id = %s AND license_key = %s FOR UPDATE",
        "WHERE product_id = %s AND license_key = %s",
        (
            "tests/test_seat_store_contract.py::TestSeveralNodes::test_fifty_over_three_nodes_grant_exactly_ten",
        ),
    ),
    Sabotage(
        "a node that missed a NOTIFY still drops what another node dropped",
        "license_server/storage/pg_answers.py",
        'await conn.execute("INSERT INTO answer_drops (payload) VALUES (%s)", (payload,))',
        "pass",
        ("tests/test_answer_store_contract.py::TestDroppedOnEveryNode",),
    ),
    Sabotage(
        "the database anchors each node's audit head",
        "license_server/storage/pg_audit.py",
        "                if head_seq is None or last > head_seq:",
        "                if head_seq is None:",
        ("tests/test_audit_shared.py",),
    ),
    Sabotage(
        "the database keeps console sessions only as hashes",
        "license_server/admin/sessions.py",
        'return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).digest()',
        'return sid.encode("utf-8", "surrogatepass")',
        ("tests/test_shared_console.py",),
    ),
    Sabotage(
        "a late activation does not undo a deactivation written before it",
        "license_server/storage/pg_seats.py",
        '" deactivated = CASE WHEN t.deactivated >= excluded.last_seen THEN t.deactivated END",',
        '" deactivated = NULL",',
        (
            "tests/test_partition.py::test_one_node_cut_off_answers_alike_and_leaves_the_state_of_a_run_without_it",
        ),
    ),
    Sabotage(
        "a write the database does not take in time goes to the spool",
        "license_server/storage/spool.py",
        "DEADLINE = 1.0  # seconds a write waits for the database before it is spooled",
        "DEADLINE = 30.0  # seconds a write waits for the database before it is spooled",
        (
            "tests/test_db_spool.py::test_daemon_answers_while_the_database_is_down_and_writes_it_all_once_after",
        ),
    ),
)


def scratch_copy(target: Path) -> None:
    """Copy the working tree (tracked and untracked files, not ignored ones) to `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = ROOT / os.fsdecode(raw)
        if source.is_file():
            destination = target / os.fsdecode(raw)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def pytest(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Run tests in the scratch copy, against the copy's package; (exit status, last lines of output)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy's package, also in daemon subprocesses
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    return done.returncode, "\n".join(done.stdout.strip().splitlines()[-3:])


def run(sabotage: Sabotage, tree: Path) -> tuple[bool, float, str]:
    """Break the copy, run the guarding tests, restore the copy; (the tests failed, seconds, output tail)."""
    path = tree / sabotage.file
    text = path.read_text()
    if text.count(sabotage.original) != 1:
        return False, 0.0, f"the original text is not found exactly once in {sabotage.file}"
    path.write_text(text.replace(sabotage.original, sabotage.broken))
    started = time.monotonic()
    try:
        status, tail = pytest(tree, sabotage.tests)
    finally:
        path.write_text(text)
    return status == 1, time.monotonic() - started, tail


def main() -> int:
    """Run every sabotage (or those named) and report which ones the tests caught."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="run only sabotages whose name contains this text")
    args = parser.parse_args()
    chosen = [s for s in SABOTAGES if args.only is None or args.only in s.name]
    missed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="license-server-sabotage-") as folder:
        tree = Path(folder)
        scratch_copy(tree)
        # Unbroken, every guarding test passes: a failure below is then the sabotage's doing.
        status, tail = pytest(tree, tuple(sorted({test for s in chosen for test in s.tests})))
        if status != 0:
            print(f"the guarding tests fail without any sabotage:\n{tail}")
            return 1
        for sabotage in chosen:
            caught, seconds, tail = run(sabotage, tree)
            print(f"{'caught' if caught else 'MISSED'}  {seconds:5.1f} s  {sabotage.name}", flush=True)
            if not caught:
                missed.append(sabotage.name)
                print(f"        {tail}", flush=True)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} sabotages caught by the tests")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

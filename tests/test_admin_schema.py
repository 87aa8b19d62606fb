"""The admin API against its OpenAPI file: schemathesis sends what the file allows, and what it does not.

Every operation, valid and invalid input, with the bearer token; no answer may be a server error.
Examples are bounded and derandomized, so the run takes seconds and fails the same way every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.admin_support import Admin
from tests.conftest import Workstation

EXAMPLES = 25  # per operation and generation mode


def fuzz(document: dict[str, Any], base: str, headers: dict[str, str]) -> list[str]:
    """Run every operation of the document against the console; returns what was tested (blocking)."""
    schema = schemathesis.openapi.from_dict(document)
    tested: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=base, headers=headers, timeout=10)
                case.validate_response(response, checks=[not_a_server_error], headers=headers)

            check()
            tested.append(f"{operation.method.upper()} {operation.path} {mode.value}")
    return tested


async def test_no_input_makes_a_server_error(admin: Admin, workstation: Callable[..., Workstation]) -> None:
    """Every operation, valid and invalid input: never a 5xx (upstream is up in this test)."""
    license_key, message = await workstation("alice-1").activate(friendly_name="ALICE-LAPTOP")
    assert license_key is not None, message
    status, document, _ = await admin.api("GET", "/api/openapi.json")
    assert status == 200
    tested = await asyncio.to_thread(fuzz, document, admin.base, admin.bearer)
    assert len(tested) == 2 * len([m for item in document["paths"].values() for m in item])

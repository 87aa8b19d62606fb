"""Benchmark data: licenses, Python-SDK-shaped Activate forms, pre-signed answers and kept-answer stores."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import orjson

from license_server.licensing.protocol import Call, TokenFingerprints, parse_fields
from license_server.licensing.signatures import SignedLicense, parse_signed_answer, runway_facts
from license_server.storage.answers import Kept, Store
from license_server.storage.state import ANSWERS_FILE, load_fingerprint_key
from tests.fake_upstream import Activation, FakeCryptolens

METHOD = "key/activate"
PATH = "/api/key/activate"  # the Python SDK's server_address ".../api/" plus the method
# (product id, access token): a vendor ships one token per product in its application.
PRODUCTS = (
    ("3349", "WyI0NjU4NzQyIiwiWkJqdG5ISk9MOG5aUXlFNndzWXFXR05uNVlPWXBKK1gzZG45VnB0YiJd"),
    ("4186", "WyI0NjU5MTAzIiwiUTdkUmhYK0xuR3R2NDNzYVl1d0VQbkw5MmNLYk1UeFpmMFZvaUpoZSJd"),
)
MACHINES_PER_LICENSE = 5  # five activated machines make a signed answer of about 2 KB
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def license_key(index: int) -> str:
    """A Cryptolens-style key (four groups of five letters), the same for an index on every run."""
    digest = hashlib.sha256(f"license-{index}".encode()).digest()
    letters = "".join(_LETTERS[b % 26] for b in digest[:20])
    return "-".join(letters[i : i + 5] for i in range(0, 20, 5))


def machine_code(license_index: int, machine: int) -> str:
    """A machine code as the Python SDK's GetMachineCode makes it: SHA-256 hex of a machine id."""
    return hashlib.sha256(f"machine-{license_index}-{machine}".encode()).hexdigest()


def friendly_name(license_index: int, machine: int) -> str:
    """The machine's name as applications pass it (platform.node())."""
    return f"ENG-WS-{license_index * MACHINES_PER_LICENSE + machine:05d}"


def product_of(license_index: int) -> tuple[str, str]:
    """(product id, token) of a license: licenses alternate between the products."""
    return PRODUCTS[license_index % len(PRODUCTS)]


def activate_form(license_index: int, machine: int) -> str:
    """The exact body `licensing.methods.Key.activate` (SDK 0.54) posts, fields in its order."""
    product, token = product_of(license_index)
    return urlencode(
        {
            "token": token,
            "ProductId": product,
            "key": license_key(license_index),
            "MachineCode": machine_code(license_index, machine),
            "FieldsToReturn": 0,
            "metadata": False,
            "FloatingTimeInterval": 0,
            "MaxOverdraft": 0,
            "FriendlyName": friendly_name(license_index, machine),
            "ModelVersion": 3,
            "Sign": "True",
            "SignMethod": 1,
        }
    )


def pairs(licenses: int) -> Iterator[tuple[int, int]]:
    """Every (license, machine) of the first `licenses` licenses; a license's machines come far apart."""
    for machine in range(MACHINES_PER_LICENSE):
        for index in range(licenses):
            yield index, machine


@dataclass(frozen=True, slots=True)
class Vendor:
    """The vendor's public key and one signed Activate answer per license, signed once at setup."""

    public_key_xml: str
    answers: tuple[bytes, ...]  # by license index

    @classmethod
    def sign(cls, licenses: int) -> Vendor:
        """Make a vendor key and sign an answer for each license, listing all its machines."""
        fake = FakeCryptolens()
        now = fake.now()
        answers = []
        for index in range(licenses):
            product, _ = product_of(index)
            machines = [
                Activation(
                    machine_code(index, m),
                    f"10.20.{index % 250}.{m + 10}",
                    now - 30 * 86400,
                    friendly_name(index, m),
                )
                for m in range(MACHINES_PER_LICENSE)
            ]
            lic = fake.add_license(
                int(product), license_key(index), max_machines=MACHINES_PER_LICENSE, activations=machines
            )
            answers.append(fake.sign_answer(lic))
        return cls(fake.public_key_xml, tuple(answers))

    def answer(self, license_index: int) -> bytes:
        """The signed answer of a license; licenses past those signed reuse one, which verifies as well."""
        return self.answers[license_index % len(self.answers)]

    def write_upstream_answers(self, path: Path) -> None:
        """The fake upstream's table: "product/key" to the signed answer it serves."""
        table = {f"{product_of(i)[0]}/{license_key(i)}": body.decode() for i, body in enumerate(self.answers)}
        path.write_text(json.dumps(table))


def write_forms(path: Path, licenses: int) -> int:
    """Write the forms of `licenses` licenses, one per line, for wrk; returns how many."""
    lines = [activate_form(index, machine) for index, machine in pairs(licenses)]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def fill_state_dir(state_dir: Path, vendor: Vendor, licenses: int, *, age: float = 3600.0) -> int:
    """Keep an answer for every form of `licenses` licenses, as the daemon would have; returns how many.

    Each answer was fetched at its own moment over the day before `age` ago, as workstations' calls are
    spread, so that no report gains from many answers sharing one fetch time.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # as the daemon makes it: no warning at start
    secret = load_fingerprint_key(state_dir)  # made here as the daemon makes it at its first start
    return asyncio.run(_fill(state_dir, secret, vendor, licenses, time.time() - age))


async def _fill(state_dir: Path, secret: bytes, vendor: Vendor, licenses: int, latest: float) -> int:
    """Write Kept rows through the daemon's own Store, with cache keys from its own Call."""
    moments = random.Random(licenses)  # the same fetch times for the same data set
    store = Store(state_dir / ANSWERS_FILE)
    fingerprints = TokenFingerprints(secret)
    await store.open()
    signed: dict[int, SignedLicense] = {}
    try:
        for number, (index, machine) in enumerate(pairs(licenses), 1):
            call = Call.from_fields(METHOD, parse_fields(activate_form(index, machine)))
            body = vendor.answer(index)
            if index not in signed:
                found = parse_signed_answer(orjson.loads(body))
                assert found is not None
                signed[index] = found
            store.put(
                Kept(
                    cache_key=call.cache_key(fingerprints),
                    method=call.method,
                    product_id=call.product_id,
                    license_key=call.license_key.upper(),
                    machine_code=call.machine_code,
                    fetched_at=latest - moments.uniform(0, 86400),
                    body=body,
                    facts=runway_facts(signed[index], call.machine_code, body),  # as the daemon keeps them
                )
            )
            if number % 10_000 == 0:
                await store.flush()
        return await store.count()
    finally:
        await store.close()

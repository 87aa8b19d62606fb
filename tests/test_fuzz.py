"""Property tests of what reads hostile input: paths, forms, cache keys, license files, signatures, HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from license_server.config import DEFAULT_ALLOWED_METHODS
from license_server.licensing.license_files import LicenseFiles
from license_server.licensing.protocol import (
    Call,
    RequestError,
    TokenFingerprints,
    form_pairs,
    normalise_path,
    parse_answer,
    parse_fields,
)
from license_server.licensing.signatures import (
    AnswerFormatError,
    KeyRing,
    SignedLicense,
    load_public_key,
    parse_signed_answer,
    verify_metadata,
    verify_signed,
)
from license_server.web.listener import ConnectionGuard, GuardedSite
from tests.conftest import LICENSE, PRODUCT, Daemon, Upstream
from tests.fake_upstream import FakeCryptolens
from tests.test_hostile import FORM, exchange, serve_guarded
from tests.test_signatures import VECTOR_KEY as VECTOR_KEY_FILE
from tests.test_signatures import VECTOR_SKM as VECTOR_SKM_FILE

VECTOR_SKM = VECTOR_SKM_FILE.read_bytes()
VECTOR_KEY = VECTOR_KEY_FILE.read_text()
SECRET = b"\x01" * 32
METHOD = re.compile(r"[a-z0-9]+/[a-z0-9]+")

# Pieces of paths the SDKs write, and the tricks that try to leave /api/ or smuggle bytes past the router.
PATH_PIECES = st.sampled_from(
    [
        *("api", "API", "Api", "key", "Key", "KEY", "activate", "Activate", "getkey", "deactivate"),
        *("", ".", "..", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "\\", "%0d%0a", "%0a", "%00"),
        *(
            "\x00",
            "\r\n",
            "\t",
            "%20",
            " ",
            "+",
            "é",
            "\uff4b\uff45\uff59",
            "\uff41\uff50\uff49",
            "\u212aey",
            "İ",
            "ß",
            "\ufeff",
        ),
        *("x@evil.example", "evil.example", "http:", ";", "?", "#", "%3f", "%23", "%25", "~", "*"),
    ]
)
PATHS = st.builds(
    lambda lead, parts, tail: lead + "/".join(parts) + tail,
    st.sampled_from(["", "/", "//", "/./", "/../"]),
    st.lists(st.one_of(PATH_PIECES, st.text(max_size=6)), max_size=6),
    st.sampled_from(["", "/", "//", "/.", "?x=1"]),
)


def check_path(path: str) -> None:
    """normalise_path: None or a bare `controller/method` in ASCII letters and digits, and a fixed point."""
    method = normalise_path(path)
    if method is None:
        return
    assert METHOD.fullmatch(method), (path, method)
    assert normalise_path("/api/" + method) == method
    assert normalise_path("//API//" + method.upper() + "//") == method
    controller, name = method.split("/")
    # Nothing but three non-empty segments, the first of them "api" in some case, names a method.
    segments = [segment for segment in path.split("/") if segment]
    assert len(segments) == 3
    assert segments[0].lower() == "api"
    assert (segments[1].lower(), segments[2].lower()) == (controller, name)


class TestPaths:
    """Path normalisation never raises, is idempotent, and nothing outside /api/<word>/<word> gets through."""

    @given(PATHS)
    def test_tricks(self, path: str) -> None:
        """Dot segments, encoded separators, CR/LF/NUL and unicode never name anything but a plain method."""
        check_path(path)

    @given(st.text(max_size=40))
    def test_any_text(self, path: str) -> None:
        """Any text at all gives a plain method or None."""
        check_path(path)

    @pytest.mark.parametrize(
        "path",
        [
            "/api/key/%2e%2e",
            "/api/%2e%2e/activate",
            "/api/key/activate%00",
            "/api/key/activate\x00",
            "/api/key/activate%0d%0a",
            "/api/\uff4b\uff45\uff59/activate",
            "/api/key/activate/extra",
            "/api/../key/activate",
            "/api/key/../activate",
        ],
    )
    def test_refused_spellings(self, path: str) -> None:
        """The classic escapes are not API paths."""
        assert normalise_path(path) is None


FORM_ALPHABET = st.sampled_from("abkeyTOKN=&%+2c0FZé\u00ff \x00;\r\n")


def parsed_or_refused(source: str) -> dict[str, str] | RequestError:
    """The fields of a form, or the daemon's refusal of it."""
    try:
        return parse_fields(source)
    except RequestError as exc:
        return exc


def check_form(source: str) -> None:
    """parse_fields: lower-cased unique names, or the documented RequestError 400, never anything else."""
    fields = parsed_or_refused(source)
    if isinstance(fields, RequestError):
        assert fields.status == 400
        assert fields.message
        return
    assert all(name == name.lower() for name in fields)
    assert len(fields) == len(form_pairs(source)) if source else fields == {}


class TestForms:
    """Forms: only clean refusals, and a field named twice is refused in any case and in either source."""

    @given(st.text(FORM_ALPHABET, max_size=60))
    def test_only_clean_refusals(self, source: str) -> None:
        """Any text is parsed into unique lower-case names or refused with 400."""
        check_form(source)

    @given(st.binary(max_size=80))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        """Bytes decoded as the handler decodes a body (latin-1 stands in for what UTF-8 refuses)."""
        check_form(raw.decode("utf-8", errors="ignore"))
        check_form(raw.decode("latin-1"))

    @pytest.mark.parametrize(
        "source", ["a=%ED%A0%80", "a=%ed%b0%80", "%ED%A0%80=1", "a=%F0%9F", "a=1&b=%ED%BF%BF"]
    )
    def test_no_lone_surrogates(self, source: str) -> None:
        """A %-escape that would make a lone surrogate (or half a character) is refused as not UTF-8."""
        with pytest.raises(RequestError) as refused:
            parse_fields(source)
        assert refused.value.status == 400

    def test_value_strategy_draws_wire_text(self) -> None:
        """The cache-key properties draw only values a form can carry: never a lone surrogate."""
        surrogate = re.compile("[\ud800-\udfff]")
        checked = settings(database=None, derandomize=True, max_examples=3000)
        with pytest.raises(NoSuchExample):
            find(
                st.text(NO_SEPARATORS, max_size=10),
                lambda value: bool(surrogate.search(value)),
                settings=checked,
            )

    @given(
        name=st.sampled_from(["token", "key", "ProductId", "MachineCode", "Sign", "metadata"]),
        first=st.text(string.ascii_letters + string.digits, max_size=8),
        second=st.text(string.ascii_letters + string.digits, max_size=8),
        recase=st.sampled_from([str.lower, str.upper, str.title, str]),
        split=st.booleans(),
    )
    def test_duplicate_refused(
        self, name: str, first: str, second: str, recase: Callable[[str], str], split: bool
    ) -> None:
        """A field given twice, in any spelling of its name, in the form or split over form and query."""
        one, two = f"{name}={first}", f"{recase(name)}={second}"
        sources = (f"a=1&{one}", f"{two}&b=2") if split else (f"a=1&{one}&{two}",)
        with pytest.raises(RequestError) as refused:
            parse_fields(*sources)
        assert refused.value.status == 400
        assert "more than once" in refused.value.message


# The fields every SDK sends to Activate, with values in each SDK's spelling.
SDK_FIELDS = {
    "token": "good-token",
    "ProductId": "3349",
    "Key": LICENSE,
    "MachineCode": "9f2c1e",
    "Sign": "True",
    "SignMethod": "1",
    "metadata": "False",
    "FloatingTimeInterval": "0",
    "MaxOverdraft": "0",
    "FieldsToReturn": "0",
    "ModelVersion": "3",
    "FriendlyName": "LAB-PC",
    "OSInfo": "Windows",
}
# Fields that shape the answer: changing any one of them must change the key.
ANSWER_FIELDS = [
    "ProductId",
    "Key",
    "MachineCode",
    "Sign",
    "SignMethod",
    "metadata",
    "FloatingTimeInterval",
    "MaxOverdraft",
    "FieldsToReturn",
    "ModelVersion",
]
NAME_CASES = st.sampled_from([str.lower, str.upper, str, lambda s: s[:1].upper() + s[1:]])


# NUL and SOH separate fields in a cache key: a form holding them is refused. Only text UTF-8 can carry: a
# lone surrogate never reaches a field (a body or %-escape that would make one is refused as not UTF-8,
# and aiohttp refuses raw non-ASCII bytes in a request target), see TestForms.test_no_lone_surrogates.
NO_SEPARATORS = st.characters(codec="utf-8", exclude_characters="\x00\x01")


def cache_key_of(method: str, pairs: list[tuple[str, str]], secret: bytes = SECRET) -> bytes:
    """The cache key of a call whose form carries these pairs, parsed as the daemon parses it."""
    form = "&".join(f"{quote(name)}={quote(value)}" for name, value in pairs)
    return Call.from_fields(method, parse_fields(form)).cache_key(TokenFingerprints(secret))


def with_token(token: str) -> list[tuple[str, str]]:
    """The SDK's fields with another access token."""
    return [*((name, value) for name, value in SDK_FIELDS.items() if name != "token"), ("token", token)]


class TestCacheKeys:
    """One answer, one key: the same however an SDK orders and cases its fields, different otherwise."""

    @given(
        order=st.permutations(list(SDK_FIELDS.items())),
        cases=st.lists(NAME_CASES, min_size=len(SDK_FIELDS), max_size=len(SDK_FIELDS)),
        bools=st.sampled_from(["True", "true", "TRUE"]),
        friendly=st.text(NO_SEPARATORS, max_size=10),
    )
    def test_same_call_same_key(
        self,
        order: list[tuple[str, str]],
        cases: list[Callable[[str], str]],
        bools: str,
        friendly: str,
    ) -> None:
        """Field order, name case, a boolean's case and who the machine says it is do not change the key."""
        respelt = []
        for (name, value), case in zip(order, cases, strict=True):
            if name == "Sign":
                value = bools
            elif name == "FriendlyName":
                value = friendly
            respelt.append((case(name), value))
        assert cache_key_of("key/activate", respelt) == cache_key_of("key/activate", list(SDK_FIELDS.items()))

    @given(
        name=st.sampled_from(ANSWER_FIELDS),
        value=st.text(string.ascii_letters + string.digits + "-:", min_size=1, max_size=12),
    )
    def test_answer_field_changes_key(self, name: str, value: str) -> None:
        """A different value of any answer-shaping field is a different key."""
        if value.lower() == SDK_FIELDS[name].lower():
            return
        changed = {**SDK_FIELDS, name: value}
        assert cache_key_of("key/activate", list(changed.items())) != cache_key_of(
            "key/activate", list(SDK_FIELDS.items())
        )

    @given(
        name=st.text(string.ascii_letters, min_size=1, max_size=10), value=st.text(NO_SEPARATORS, max_size=8)
    )
    def test_extra_field_changes_key(self, name: str, value: str) -> None:
        """A field the daemon does not know still shapes the key: it may shape the answer."""
        if name.lower() in {n.lower() for n in SDK_FIELDS}:
            return
        extra = [*SDK_FIELDS.items(), (name, value)]
        assert cache_key_of("key/activate", extra) != cache_key_of("key/activate", list(SDK_FIELDS.items()))

    @given(
        name=st.sampled_from(["ProductId", "Key", "MachineCode"]),
        pad=st.text(" \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000", min_size=1, max_size=3),
        where=st.sampled_from(["before", "after", "both"]),
    )
    def test_surrounding_whitespace_changes_key(self, name: str, pad: str, where: str) -> None:
        """A value with spaces around it is another call: it never shares the plain value's kept answer."""
        value = SDK_FIELDS[name]
        spelt = {"before": pad + value, "after": value + pad, "both": pad + value + pad}[where]
        changed = {**SDK_FIELDS, name: spelt}
        assert cache_key_of("key/activate", list(changed.items())) != cache_key_of(
            "key/activate", list(SDK_FIELDS.items())
        )

    @given(
        first=st.text(string.printable, min_size=8, max_size=40),
        second=st.text(string.printable, min_size=8, max_size=40),
    )
    def test_token_in_key_but_never_in_clear(self, first: str, second: str) -> None:
        """Two tokens are two keys; no key holds the token, in bytes or hex; another secret, another key."""
        one = cache_key_of("key/activate", with_token(first))
        if first != second:
            assert cache_key_of("key/activate", with_token(second)) != one
        for shown in (one, one.hex().encode()):
            assert first.encode() not in shown
        assert cache_key_of("key/activate", with_token(first), b"\x02" * 32) != one

    @pytest.mark.parametrize("separator", ["\x00", "\x01"])
    def test_separator_in_value_refused(self, separator: str) -> None:
        """A value holding a cache key's field separators is refused, so it cannot pose as two fields."""
        plain = list(SDK_FIELDS.items())
        forged = [(n, v) for n, v in plain if n not in ("MachineCode", "MaxOverdraft")]
        forged.append(("MachineCode", f"{SDK_FIELDS['MachineCode']}{separator}maxoverdraft"))
        with pytest.raises(RequestError) as refused:
            cache_key_of("key/activate", forged)
        assert refused.value.status == 400

    @given(st.sampled_from(sorted(DEFAULT_ALLOWED_METHODS)), st.sampled_from(sorted(DEFAULT_ALLOWED_METHODS)))
    def test_method_changes_key(self, one: str, two: str) -> None:
        """The same form sent to two methods has two keys."""
        pairs = list(SDK_FIELDS.items())
        assert (cache_key_of(one, pairs) == cache_key_of(two, pairs)) == (one == two)


@pytest.fixture(scope="module")
def fake(vendor_key: rsa.RSAPrivateKey) -> FakeCryptolens:
    """A fake service holding one license, used only for its signing."""
    service = FakeCryptolens(vendor_key)
    service.add_license(PRODUCT, LICENSE, max_machines=3)
    return service


@pytest.fixture(scope="module")
def keyring(fake: FakeCryptolens) -> KeyRing:
    """The fake's vendor key and the 2019 vector's key."""
    return KeyRing([load_public_key(fake.public_key_xml), load_public_key(VECTOR_KEY)])


@pytest.fixture(scope="module")
def signed_files(fake: FakeCryptolens) -> list[bytes]:
    """Valid license files: the 2019 vector Cryptolens signed, and the fake's camelCase and PascalCase."""
    lic = fake.license(PRODUCT, LICENSE)
    return [
        VECTOR_SKM,
        fake.license_file(lic).encode(),
        fake.license_file(lic, pascal_case=True).encode(),
    ]


def load_one(raw: bytes, keyring: KeyRing) -> SignedLicense | None:
    """LicenseFiles.load over a folder holding just this file: its signed license, or None if skipped."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "license.skm").write_bytes(raw)
        files, problems = LicenseFiles.load(Path(folder), keyring)
    loaded = list(files)
    assert len(loaded) + len(problems) == 1
    return loaded[0].signed if loaded else None


def signed_parts(raw: bytes) -> tuple[bytes, int]:
    """The signed payload bytes and the signature's integer value of a valid file."""
    signed = parse_signed_answer(json.loads(raw))
    assert signed is not None
    return signed.payload, int.from_bytes(signed.signature, "big")


class TestLicenseFiles:
    """License files: no input crashes the loader, and no change to the signed bytes is accepted."""

    def test_originals_load(self, signed_files: list[bytes], keyring: KeyRing) -> None:
        """The unmodified files verify (so the mutations below are refused for what they change)."""
        for raw in signed_files:
            assert load_one(raw, keyring) is not None

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(raw=st.binary(max_size=300))
    def test_arbitrary_bytes(self, raw: bytes, keyring: KeyRing) -> None:
        """Any bytes are skipped with a reason, never raised on."""
        assert load_one(raw, keyring) is None

    @given(
        answer=st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
            ),
            max_leaves=20,
        )
    )
    def test_arbitrary_json(self, answer: Any, keyring: KeyRing) -> None:
        """Any JSON document is skipped with a reason."""
        assert load_one(json.dumps(answer).encode(), keyring) is None

    @given(data=st.data())
    def test_mutated_file_rejected_unless_signed_bytes_unchanged(
        self, data: st.DataObject, signed_files: list[bytes], keyring: KeyRing
    ) -> None:
        """Flip, replace, insert or delete bytes anywhere: accepted only if the signed bytes are the same."""
        raw = bytearray(data.draw(st.sampled_from(signed_files)))
        original = signed_parts(bytes(raw))
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(raw) - 1))
            edit = data.draw(st.sampled_from(["flip", "replace", "insert", "delete"]))
            if edit == "flip":
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            elif edit == "replace":
                raw[at] = data.draw(st.integers(0, 255))
            elif edit == "insert":
                raw.insert(at, data.draw(st.integers(0, 255)))
            else:
                del raw[at]
        signed = load_one(bytes(raw), keyring)
        if signed is not None:
            assert (signed.payload, int.from_bytes(signed.signature, "big")) == original

    @given(data=st.data())
    def test_changed_payload_rejected(
        self, data: st.DataObject, signed_files: list[bytes], keyring: KeyRing
    ) -> None:
        """Any bit of the decoded licenseKey flipped and the file re-encoded cleanly: refused."""
        raw = data.draw(st.sampled_from(signed_files))
        answer = json.loads(raw)
        name = next(n for n in answer if n.lower() == "licensekey")
        payload = bytearray(base64.b64decode(answer[name]))
        bit = data.draw(st.integers(0, len(payload) * 8 - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
        answer[name] = base64.b64encode(bytes(payload)).decode()
        assert load_one(json.dumps(answer).encode(), keyring) is None


def flip_bit(b64: str, bit: int) -> str:
    """Base64 text of the decoded bytes with one bit flipped."""
    raw = bytearray(base64.b64decode(b64))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    return base64.b64encode(bytes(raw)).decode()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
B64_TEXT = st.binary(max_size=300).map(lambda raw: base64.b64encode(raw).decode())


class TestSignatures:
    """Signature handling: one flipped bit anywhere is a refusal; no made-up answer ever verifies."""

    @given(data=st.data(), field=st.sampled_from(["licenseKey", "signature"]))
    def test_bit_flip_rejected(
        self, data: st.DataObject, field: str, fake: FakeCryptolens, keyring: KeyRing
    ) -> None:
        """A signed answer with any one bit of its licenseKey or signature flipped does not verify."""
        answer = json.loads(fake.sign_answer(fake.license(PRODUCT, LICENSE), metadata=True))
        assert verify_signed(keyring, parse_signed_answer(answer) or pytest.fail("no signed license"))
        answer[field] = flip_bit(answer[field], data.draw(st.integers(0, 8 * 400)))
        try:
            signed = parse_signed_answer(answer)
        except AnswerFormatError:
            return  # a flipped licenseKey that is no longer JSON: refused before the signature is read
        assert signed is not None
        assert not verify_signed(keyring, signed)

    @given(extra=st.integers(1, 64), fill=st.integers(1, 255))
    def test_longer_signature_rejected(
        self, extra: int, fill: int, fake: FakeCryptolens, keyring: KeyRing
    ) -> None:
        """A signature longer than the modulus with non-zero leading bytes is refused, not raised on."""
        answer = json.loads(fake.sign_answer(fake.license(PRODUCT, LICENSE)))
        signature = bytes([fill]) * extra + base64.b64decode(answer["signature"])
        answer["signature"] = base64.b64encode(signature).decode()
        signed = parse_signed_answer(answer)
        assert signed is not None
        assert not verify_signed(keyring, signed)

    @given(data=st.data())
    def test_metadata_bit_flip_rejected(
        self, data: st.DataObject, fake: FakeCryptolens, keyring: KeyRing
    ) -> None:
        """One bit flipped in the metadata envelope's Data or Signature: the metadata does not verify."""
        metadata = json.loads(fake.sign_answer(fake.license(PRODUCT, LICENSE), metadata=True))["metadata"]
        assert verify_metadata(keyring, metadata)
        envelope = json.loads(base64.b64decode(metadata["signature"]))
        part = data.draw(st.sampled_from(["Data", "Signature"]))
        envelope[part] = flip_bit(envelope[part], data.draw(st.integers(0, 8 * 600)))
        metadata["signature"] = base64.b64encode(json.dumps(envelope).encode()).decode()
        assert not verify_metadata(keyring, metadata)

    @settings(max_examples=200)
    @given(
        answer=st.one_of(
            JSON_VALUES,
            st.fixed_dictionaries(
                {
                    "licenseKey": st.one_of(B64_TEXT, JSON_VALUES),
                    "signature": st.one_of(B64_TEXT, JSON_VALUES),
                },
                optional={"result": JSON_VALUES, "metadata": JSON_VALUES},
            ),
            st.builds(
                lambda payload, signature: {
                    "licenseKey": base64.b64encode(json.dumps(payload).encode()).decode(),
                    "signature": signature,
                },
                JSON_VALUES,
                B64_TEXT,
            ),
        )
    )
    def test_made_up_answers_never_verify(self, answer: Any, keyring: KeyRing) -> None:
        """Any JSON: parsed or refused with AnswerFormatError, and never verified."""
        try:
            signed = parse_signed_answer(answer)
        except AnswerFormatError:
            signed = None
        if signed is not None:
            assert not verify_signed(keyring, signed)
        assert not verify_metadata(keyring, answer)
        if isinstance(answer, dict):
            assert not verify_metadata(keyring, answer.get("metadata"))

    @given(st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
    def test_upstream_answer_outline_never_raises(self, body: bytes) -> None:
        """parse_answer reads any body as an answer or None."""
        answer = parse_answer(body)
        assert answer is None or isinstance(answer.result, int)

    @pytest.mark.parametrize("depth", [10_000, 200_000])
    def test_deeply_nested_answer(self, depth: int) -> None:
        """A deeply nested body (well inside upstream.max_answer_bytes) is not an answer, not a crash."""
        assert parse_answer(b"[" * depth + b"]" * depth) is None
        assert parse_answer(b'{"result":0,"x":' + b"[" * depth + b"]" * depth + b"}") is None


REQUEST_BYTES = st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b"\x00",
        b" ",
        b"\t",
        b":",
        b",",
        b";",
        b"chunked",
        b"Content-Length: 7\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        b"HTTP/1.1",
        b"\xff",
        b"%",
        b"\x7f",
        b"a",
    ]
)


def refused_as_json(status: int, headers: dict[str, str], body: bytes) -> None:
    """An answer the daemon wrote, or no answer at all; never aiohttp's plain text or a server error."""
    if status == 0:
        return
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    answer = json.loads(body)
    assert isinstance(answer["result"], int)
    assert status < 500 or status in (502, 503, 504), (status, body)


@pytest.fixture
async def listener(daemon: Daemon) -> int:
    """The port of the daemon behind the listener `license-server serve` uses."""
    return await serve_guarded(daemon)


FUZZ_HTTP = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class TestHttp:
    """Malformed HTTP on the production listener: a JSON answer or a closed connection, nothing upstream."""

    @FUZZ_HTTP
    @given(data=st.data())
    async def test_mutated_requests(self, data: st.DataObject, listener: int, upstream: Upstream) -> None:
        """A call with bytes inserted, deleted or replaced: JSON or nothing; upstream sees valid calls."""
        raw = bytearray(
            b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(FORM)}\r\nConnection: close\r\n\r\n{FORM}".encode()
        )
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(raw)))
            edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
            piece = data.draw(REQUEST_BYTES)
            if edit == "insert":
                raw[at:at] = piece
            elif edit == "delete":
                del raw[at : at + len(piece)]
            else:
                raw[at : at + len(piece)] = piece
        before = len(upstream.fake.calls)
        # A mutation may leave the request incomplete: the daemon then waits for the rest, and so not we.
        status, headers, body = await exchange_closing(listener, bytes(raw), wait=0.3)
        refused_as_json(status, headers, body)
        for call in upstream.fake.calls[before:]:
            assert call.path in DEFAULT_ALLOWED_METHODS

    @FUZZ_HTTP
    @given(path=PATHS)
    async def test_paths_never_leave_api(self, path: str, listener: int, upstream: Upstream) -> None:
        """Any request target: JSON back, and upstream is only ever asked an allowed /api/ method."""
        target = quote(path, safe="/%?=&@:;.~*+\\") or "/"
        request = (
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(FORM)}\r\nConnection: close\r\n\r\n{FORM}"
        ).encode()
        before = len(upstream.fake.calls)
        status, headers, body = await exchange_closing(listener, request)
        refused_as_json(status, headers, body)
        assert status != 0
        for call in upstream.fake.calls[before:]:
            assert call.path in DEFAULT_ALLOWED_METHODS
            assert status == 200

    @FUZZ_HTTP
    @given(body=st.binary(max_size=200))
    async def test_arbitrary_bodies(self, body: bytes, listener: int, upstream: Upstream) -> None:
        """Any body on an allowed method: a JSON answer (forwarded or refused), never a crash."""
        request = (
            b"POST /api/key/getkey HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        status, headers, answer = await exchange_closing(listener, request)
        refused_as_json(status, headers, answer)
        assert status in (200, 400)

    async def test_token_not_echoed(self, listener: int) -> None:
        """aiohttp's own refusal text quotes the request line; the JSON refusal says nothing of it."""
        status, headers, body = await exchange(
            listener, b"GET /api/key/activate?token=SECRET-TOKEN HTTP/9.9\r\nHost: x\r\n\r\n"
        )
        assert status == 400
        refused_as_json(status, headers, body)
        assert b"SECRET" not in body
        assert "HTTP" in json.loads(body)["message"]

    async def test_line_too_long(self, listener: int) -> None:
        """A request line past aiohttp's limit: a JSON 400 naming the limit."""
        target = b"/api/key/activate?token=SECRET-TOKEN&x=" + b"a" * 9000
        status, headers, body = await exchange(listener, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400
        refused_as_json(status, headers, body)
        assert b"SECRET" not in body
        assert "8190 bytes" in json.loads(body)["message"]


class TestHeaderDeadline:
    """The header deadline of the production listener."""

    async def test_closes_quietly(self, daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
        """A client that trickles its headers is cut off at the deadline, without an error in the log."""
        assert daemon.server is not None
        runner = daemon.server.runner
        assert runner is not None
        assert runner.server is not None
        guard = ConnectionGuard(runner.server, 100, 0.2)
        site = GuardedSite(runner, "127.0.0.1", 0, guard, ssl_context=None)
        await site.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", site.bound[0][1])
        try:
            writer.write(b"POST /api/key/activate HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        await asyncio.sleep(0.05)
        assert guard.timed_out == 1
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def exchange_closing(port: int, request: bytes, wait: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; status, headers and body of the answer, or 0 if none came within `wait` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return 0, {}, b""
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return int(lines[0].split(" ", 2)[1]), headers, body
    finally:
        writer.close()


class TestProfiles:
    """CI runs every property on the same examples, with no example database read or written."""

    @pytest.mark.parametrize(("ci", "derandomized"), [("true", True), ("", False)])
    def test_ci_profile(self, ci: str, derandomized: bool) -> None:
        """With CI set the loaded profile is derandomised and has no database; without it, the default."""
        # The default profile first, as a Hypothesis too old to detect CI by itself would leave it.
        probe = (
            "from hypothesis import settings; settings.load_profile('default'); import tests.conftest;"
            " print(settings.default.derandomize, settings.default.database is None)"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
        if ci:
            env["CI"] = ci
        shown = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert shown == [str(derandomized), str(derandomized)]


DEEP = settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("check", "strategy"),
    [
        (check_path, PATHS),
        (check_path, st.text(max_size=60)),
        (check_form, st.text(FORM_ALPHABET, max_size=120)),
        (check_form, st.binary(max_size=200).map(lambda raw: raw.decode("latin-1"))),
    ],
)
def test_deep(check: Callable[[Any], None], strategy: st.SearchStrategy[Any]) -> None:
    """The pure-function properties above with many more examples."""
    DEEP(given(strategy)(check))()

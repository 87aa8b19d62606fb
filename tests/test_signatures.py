"""Tests for vendor key loading and verification of signed answers and metadata."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from licensing.internal import HelperMethods
from licensing.models import RSAPublicKey

from license_server.licensing.signatures import (
    AnswerFormatError,
    KeyFormatError,
    KeyRing,
    PublicKey,
    SignedLicense,
    load_public_key,
    parse_signed_answer,
    verify_metadata,
    verify_signed,
)

DATA = Path(__file__).parent / "data"
VECTOR_SKM = DATA / "cryptolens-example-2019.skm"
VECTOR_KEY = DATA / "cryptolens-example-2019.pubkey.xml"


def b64(raw: bytes) -> str:
    """Standard base64 text, as the upstream writes it."""
    return base64.b64encode(raw).decode("ascii")


def int_b64(value: int) -> str:
    """An unsigned big-endian integer in base64, as in <RSAKeyValue>."""
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def xml_key(key: rsa.RSAPublicKey) -> str:
    """The dashboard's XML form of a public key."""
    numbers = key.public_numbers()
    return (
        f"<RSAKeyValue><Modulus>{int_b64(numbers.n)}</Modulus>"
        f"<Exponent>{int_b64(numbers.e)}</Exponent></RSAKeyValue>"
    )


def sign(private: rsa.RSAPrivateKey, message: bytes, *, sha512: bool = False) -> bytes:
    """An RSASSA-PKCS1-v1_5 signature, as the upstream makes them."""
    algorithm: hashes.HashAlgorithm = hashes.SHA512() if sha512 else hashes.SHA256()
    return private.sign(message, padding.PKCS1v15(), algorithm)


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def vector_answer() -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(VECTOR_SKM.read_text())
    return answer


@pytest.fixture(scope="module")
def vector_key() -> PublicKey:
    return load_public_key(VECTOR_KEY.read_text())


@pytest.fixture(scope="module")
def vector_signed(vector_answer: dict[str, Any]) -> SignedLicense:
    signed = parse_signed_answer(vector_answer)
    assert signed is not None
    return signed


# --- the real upstream vector -------------------------------------------------------------------


def test_vector_verifies(vector_key: PublicKey, vector_signed: SignedLicense) -> None:
    assert vector_key.verify(vector_signed.payload, vector_signed.signature)
    assert verify_signed(KeyRing([vector_key]), vector_signed)


def test_vector_fields(vector_signed: SignedLicense, vector_answer: dict[str, Any]) -> None:
    assert vector_signed.license_key_b64 == vector_answer["licenseKey"]
    assert vector_signed.signature_b64 == vector_answer["signature"]
    assert vector_signed.payload == base64.b64decode(vector_answer["licenseKey"])
    assert vector_signed.product_id == 3941
    assert vector_signed.key == "ETXYI-GFILQ-UXAXK-GGKSU"
    assert vector_signed.machines == ("test",)
    assert dict(vector_signed.floating_expires) == {}
    assert vector_signed.max_machines == 1
    assert vector_signed.block is False
    assert vector_signed.sign_date == 1551715310
    assert vector_signed.expires == 1551424515
    assert vector_signed.matches_machine("test")
    assert not vector_signed.matches_machine("TEST")
    assert not vector_signed.matches_machine("")


def test_vector_fails_for_every_single_byte_change(
    vector_key: PublicKey, vector_signed: SignedLicense
) -> None:
    payload = vector_signed.payload
    for position in range(len(payload)):
        for flip in (0x01, 0x80):
            changed = bytearray(payload)
            changed[position] ^= flip
            assert not vector_key.verify(bytes(changed), vector_signed.signature), position


@given(data=st.data())
def test_vector_fails_for_any_byte_replacement(
    vector_key: PublicKey, vector_signed: SignedLicense, data: st.DataObject
) -> None:
    payload = vector_signed.payload
    position = data.draw(st.integers(0, len(payload) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != payload[position]))
    changed = bytearray(payload)
    changed[position] = value
    assert not vector_key.verify(bytes(changed), vector_signed.signature)


def test_vector_fails_for_truncated_or_extended_payload(
    vector_key: PublicKey, vector_signed: SignedLicense
) -> None:
    assert not vector_key.verify(vector_signed.payload[:-1], vector_signed.signature)
    assert not vector_key.verify(vector_signed.payload + b" ", vector_signed.signature)
    assert not vector_key.verify(b"", vector_signed.signature)


def test_vector_fails_for_changed_signature(vector_key: PublicKey, vector_signed: SignedLicense) -> None:
    for position in range(0, len(vector_signed.signature), 7):
        changed = bytearray(vector_signed.signature)
        changed[position] ^= 0x04
        assert not vector_key.verify(vector_signed.payload, bytes(changed)), position
    assert not vector_key.verify(vector_signed.payload, b"")
    assert not vector_key.verify(vector_signed.payload, b"\xff" * 256)
    assert not vector_key.verify(vector_signed.payload, b"\x01" * 300)


def test_vector_fails_with_other_key(
    other_private_key: rsa.RSAPrivateKey, vector_signed: SignedLicense
) -> None:
    other = load_public_key(xml_key(other_private_key.public_key()))
    assert not other.verify(vector_signed.payload, vector_signed.signature)
    assert not verify_signed(KeyRing([other]), vector_signed)


def test_vector_is_not_a_sha512_signature(vector_key: PublicKey, vector_signed: SignedLicense) -> None:
    assert not vector_key.verify(vector_signed.payload, vector_signed.signature, sha512=True)


def test_signature_with_leading_zero_bytes_stripped_still_verifies(private_key: rsa.RSAPrivateKey) -> None:
    # The SDK reads signatures as integers, so the stripped form verifies there as well.
    public = PublicKey.from_rsa(private_key.public_key())
    for counter in range(5000):
        message = b"message %d" % counter
        signature = sign(private_key, message)
        if signature[0] == 0:
            break
    else:
        pytest.skip("no signature with a leading zero byte found")
    stripped = signature.lstrip(b"\x00")
    assert public.verify(message, stripped)
    assert public.verify(message, b"\x00" + signature)


# --- key formats ---------------------------------------------------------------------------------


def _forms(key: rsa.RSAPublicKey) -> dict[str, str]:
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pkcs1 = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    assert spki.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert pkcs1.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    xml = xml_key(key)
    modulus, exponent = (int_b64(v) for v in (key.public_numbers().n, key.public_numbers().e))
    wrapped = "\n".join(modulus[i : i + 64] for i in range(0, len(modulus), 64))
    return {
        "spki": spki.decode(),
        "pkcs1": pkcs1.decode(),
        "xml": xml,
        "xml-spaced": (
            f"\ufeff\n  <RSAKeyValue>\n    <Exponent> {exponent} </Exponent>\n"
            f"    <Modulus>\n{wrapped}\n    </Modulus>\n  </RSAKeyValue>\n"
        ),
        "xml-declared": '<?xml version="1.0" encoding="utf-8"?>\r\n' + xml,
        "xmldsig": xml.replace("<RSAKeyValue>", '<RSAKeyValue xmlns="http://www.w3.org/2000/09/xmldsig#">'),
    }


def test_all_forms_of_one_key_load_and_verify(private_key: rsa.RSAPrivateKey) -> None:
    message = b'{"ProductId":1}'
    signature = sign(private_key, message)
    signature512 = sign(private_key, message, sha512=True)
    loaded = {name: load_public_key(text) for name, text in _forms(private_key.public_key()).items()}
    fingerprints = {key.fingerprint for key in loaded.values()}
    assert len(fingerprints) == 1
    fingerprint = fingerprints.pop()
    assert len(fingerprint) == 16
    assert int(fingerprint, 16) >= 0
    assert len(set(loaded.values())) == 1, "equal keys compare and hash equal"
    for name, key in loaded.items():
        assert key.key_size == 2048
        assert key.verify(message, signature), name
        assert not key.verify(message, signature, sha512=True), name
        assert key.verify(message, signature512, sha512=True), name
        assert not key.verify(message, signature512), name
        assert fingerprint in repr(key)


def test_different_keys_have_different_fingerprints(
    private_key: rsa.RSAPrivateKey, other_private_key: rsa.RSAPrivateKey
) -> None:
    one = load_public_key(xml_key(private_key.public_key()))
    two = load_public_key(xml_key(other_private_key.public_key()))
    assert one.fingerprint != two.fingerprint
    assert one != two


def test_sdk_reads_the_xml_form_the_tests_produce(private_key: rsa.RSAPrivateKey) -> None:
    message = b"hello"
    parsed = RSAPublicKey.from_string(xml_key(private_key.public_key()))
    numbers = private_key.public_key().public_numbers()
    assert HelperMethods.base642int(parsed.modulus) == numbers.n
    assert HelperMethods.RSAASSA_PKCS1_V15_VERIFY((numbers.n, numbers.e), message, sign(private_key, message))


def _private_xml(private: rsa.RSAPrivateKey) -> str:
    numbers = private.private_numbers()
    return (
        f"<RSAKeyValue><Modulus>{int_b64(numbers.public_numbers.n)}</Modulus><Exponent>AQAB</Exponent>"
        f"<P>{int_b64(numbers.p)}</P><Q>{int_b64(numbers.q)}</Q><DP>{int_b64(numbers.dmp1)}</DP>"
        f"<DQ>{int_b64(numbers.dmq1)}</DQ><InverseQ>{int_b64(numbers.iqmp)}</InverseQ>"
        f"<D>{int_b64(numbers.d)}</D></RSAKeyValue>"
    )


def test_malformed_keys_raise_clear_errors(private_key: rsa.RSAPrivateKey) -> None:
    good_modulus = int_b64(private_key.public_key().public_numbers().n)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    small_modulus = (1 << 511) | 0x1235  # odd, 512 bits: readable, but too short to accept
    cases = {
        "": "empty",
        "   \n\t": "empty",
        "AQAB": "neither",
        "ssh-rsa AAAAB3NzaC1yc2E": "neither",
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n": "cannot be read",
        "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n": "cannot be read",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n": "expected 'PUBLIC KEY'",
        private_pem: "never the private key",
        ec_pem: "not an RSA key",
        "<RSAKeyValue><Modulus>abc": "not well-formed",
        f"<RSAKey><Modulus>{good_modulus}</Modulus><Exponent>AQAB</Exponent></RSAKey>": (
            "expected <RSAKeyValue>"
        ),
        "<RSAKeyValue><Exponent>AQAB</Exponent></RSAKeyValue>": "no <Modulus>",
        f"<RSAKeyValue><Modulus>{good_modulus}</Modulus></RSAKeyValue>": "no <Exponent>",
        "<RSAKeyValue><Modulus></Modulus><Exponent>AQAB</Exponent></RSAKeyValue>": "<Modulus> is empty",
        "<RSAKeyValue><Modulus>!!!!</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>": (
            "<Modulus> is not valid base64"
        ),
        f"<RSAKeyValue><Modulus>{good_modulus}</Modulus><Exponent>AAAA</Exponent></RSAKeyValue>": (
            "<Exponent> is zero"
        ),
        f"<RSAKeyValue><Modulus>{good_modulus}</Modulus><Exponent>AAI=</Exponent></RSAKeyValue>": (
            "do not form a valid RSA key"
        ),
        (
            f"<RSAKeyValue><Modulus>{good_modulus}</Modulus><Modulus>{good_modulus}</Modulus>"
            "<Exponent>AQAB</Exponent></RSAKeyValue>"
        ): "appears twice",
        f"<RSAKeyValue><Modulus>{good_modulus}</Modulus><Exponent>AQAB</Exponent><X/></RSAKeyValue>": (
            "unexpected element <X>"
        ),
        f"<RSAKeyValue>junk<Modulus>{good_modulus}</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>": (
            "text outside"
        ),
        f"<RSAKeyValue><Modulus>{int_b64(small_modulus)}</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>": (
            "512 bits"
        ),
        _private_xml(private_key): "private-key part",
        (
            '<!DOCTYPE r [<!ENTITY m "' + good_modulus + '">]>'
            "<RSAKeyValue><Modulus>&m;</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>"
        ): "DOCTYPE",
        (
            "<RSAKeyValue><Modulus><![CDATA[" + good_modulus + "]]></Modulus>"
            "<Exponent>AQAB</Exponent></RSAKeyValue>"
        ): "refused",
        "<" + "a" * 70000: "not a public key",
    }
    for text, fragment in cases.items():
        with pytest.raises(KeyFormatError) as raised:
            load_public_key(text)
        assert fragment in str(raised.value), (text[:80], str(raised.value))


def test_billion_laughs_is_refused() -> None:
    entities = '<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)
    )
    laughs = (
        f'<?xml version="1.0"?><!DOCTYPE RSAKeyValue [{entities}]>'
        "<RSAKeyValue><Modulus>&i;</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>"
    )
    with pytest.raises(KeyFormatError, match="DOCTYPE"):
        load_public_key(laughs)


@given(st.text(max_size=300))
def test_load_public_key_raises_only_key_format_error(text: str) -> None:
    with contextlib.suppress(KeyFormatError):
        load_public_key(text)


@given(st.binary(max_size=400))
def test_load_public_key_on_garbage_in_xml_or_pem_shape(raw: bytes) -> None:
    garbage = base64.b64encode(raw).decode()
    for text in (
        f"<RSAKeyValue><Modulus>{garbage}</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>",
        f"-----BEGIN PUBLIC KEY-----\n{garbage}\n-----END PUBLIC KEY-----\n",
        f"-----BEGIN RSA PUBLIC KEY-----\n{garbage}\n-----END RSA PUBLIC KEY-----\n",
    ):
        with contextlib.suppress(KeyFormatError):
            load_public_key(text)


# --- key ring ------------------------------------------------------------------------------------


def test_keyring_any_key_verifies(
    private_key: rsa.RSAPrivateKey, other_private_key: rsa.RSAPrivateKey, vector_key: PublicKey
) -> None:
    one = PublicKey.from_rsa(private_key.public_key())
    two = PublicKey.from_rsa(other_private_key.public_key())
    message = b"payload"
    ring = KeyRing([one, vector_key])
    assert len(ring) == 2
    assert ring.verify(message, sign(private_key, message))
    assert not ring.verify(message, sign(other_private_key, message))
    assert KeyRing([vector_key, two]).verify(message, sign(other_private_key, message))
    assert ring.verify(message, sign(private_key, message, sha512=True), sha512=True)
    assert one.fingerprint in repr(ring)
    assert ring.fingerprints == (one.fingerprint, vector_key.fingerprint)
    assert list(ring) == [one, vector_key]


def test_empty_keyring_verifies_nothing(private_key: rsa.RSAPrivateKey) -> None:
    ring = KeyRing([])
    assert len(ring) == 0
    assert not ring.verify(b"m", sign(private_key, b"m"))


# --- parse_signed_answer -------------------------------------------------------------------------


def _encode_answer(payload: object, **extra: Any) -> dict[str, Any]:
    return {
        "licenseKey": b64(json.dumps(payload).encode()),
        "signature": b64(b"\x01" * 256),
        "result": 0,
        "message": "",
        **extra,
    }


def test_parse_pascal_case(vector_answer: dict[str, Any], vector_signed: SignedLicense) -> None:
    pascal = {"LicenseKey": vector_answer["licenseKey"], "Signature": vector_answer["signature"]}
    assert parse_signed_answer(pascal) == vector_signed
    shouting = {"LICENSEKEY": vector_answer["licenseKey"], "sIgNaTuRe": vector_answer["signature"]}
    assert parse_signed_answer(shouting) == vector_signed


def test_parse_same_field_twice(vector_answer: dict[str, Any], vector_signed: SignedLicense) -> None:
    same = {**vector_answer, "LicenseKey": vector_answer["licenseKey"]}
    assert parse_signed_answer(same) == vector_signed
    different = {**vector_answer, "LicenseKey": _encode_answer({})["licenseKey"]}
    with pytest.raises(AnswerFormatError, match="twice"):
        parse_signed_answer(different)


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"result": 1, "message": "Could not find the key."},
        {"licenseKey": None, "signature": None, "result": 1, "message": "x"},
        {"licenseKey": "", "signature": "", "result": 1, "message": "x"},
        {"licenseKey": "eyJ9", "result": 0},
        {"signature": "AAAA", "result": 0},
        {"licenseKey": "eyJ9", "signature": None},
        # legacy SignMethod=0 (.NET LinqSign): licenseKey is the license object itself
        {"LicenseKey": {"ProductId": 3941, "Key": "A", "Signature": "abc"}, "Signature": "AAAA", "Result": 0},
        {"licenseKey": {"ProductId": 3941}, "result": 0},
    ],
)
def test_parse_unsigned_or_legacy_returns_none(answer: dict[str, Any]) -> None:
    assert parse_signed_answer(answer) is None


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        ({"licenseKey": "not base64!", "signature": "AAAA"}, "licenseKey is not valid base64"),
        ({"licenseKey": "eyJ9", "signature": "AA"}, "signature is not valid base64"),
        ({"licenseKey": "ëyJ9", "signature": "AAAA"}, "not valid base64"),
        ({"licenseKey": 5, "signature": "AAAA"}, "licenseKey is a JSON int"),
        ({"licenseKey": ["x"], "signature": "AAAA"}, "licenseKey is a JSON list"),
        ({"licenseKey": "eyJ9", "signature": 5}, "signature is a JSON int"),
        ({"licenseKey": b64(b"\xff\xfe{}"), "signature": "AAAA"}, "not UTF-8"),
        ({"licenseKey": b64(b"{not json"), "signature": "AAAA"}, "not JSON"),
        ({"licenseKey": b64(b"[1,2]"), "signature": "AAAA"}, "not an object"),
        ({"licenseKey": b64(b"[" * 100000), "signature": "AAAA"}, "not JSON"),
        (_encode_answer({"ProductId": "3941"}), "ProductId is str"),
        (_encode_answer({"ProductId": True}), "ProductId is bool"),
        (_encode_answer({"ProductId": 1.5}), "ProductId is float"),
        (_encode_answer({"Key": 7}), "Key is int"),
        (_encode_answer({"Block": "false"}), "Block is str"),
        (_encode_answer({"SignDate": "yesterday"}), "SignDate is str"),
        (_encode_answer({"Expires": [1]}), "Expires is list"),
        (_encode_answer({"MaxNoOfMachines": {}}), "MaxNoOfMachines is dict"),
        (_encode_answer({"ActivatedMachines": {}}), "ActivatedMachines is a JSON dict"),
        (_encode_answer({"ActivatedMachines": ["m"]}), "entry is a JSON str"),
        (_encode_answer({"ActivatedMachines": [{"Mid": 5}]}), "Mid is int"),
        (_encode_answer({"ActivatedMachines": [{"IP": "1.2.3.4"}]}), "Mid is NoneType"),
        (_encode_answer({"ActivatedMachines": [{"Mid": "m", "FloatingExpires": "x"}]}), "FloatingExpires"),
        (_encode_answer({"Key": "A", "key": "B"}), "twice"),
    ],
)
def test_parse_malformed_raises(answer: dict[str, Any], fragment: str) -> None:
    with pytest.raises(AnswerFormatError) as raised:
        parse_signed_answer(answer)
    assert fragment in str(raised.value)


@pytest.mark.parametrize("answer", [[], "text", 5, None, ["licenseKey", "signature"]])
def test_parse_non_object_raises(answer: Any) -> None:
    with pytest.raises(AnswerFormatError, match="not an object"):
        parse_signed_answer(answer)


def test_parse_floating_and_defaults() -> None:
    payload = {
        "ProductId": 7,
        "Key": None,
        "ActivatedMachines": [
            {"Mid": "node-locked", "IP": "1.1.1.1", "Time": 10},
            {"Mid": "floating:ws-1", "IP": "1.1.1.1", "Time": 10, "FloatingExpires": 1700000600},
            {"Mid": "floating:overdraft:ws-2", "FloatingExpires": 1700000900},
            {"Mid": "floating:ws-3", "FloatingExpires": None},
            {"Mid": "floating:ws-4", "FloatingExpires": 0},
        ],
        "MaxNoOfMachines": None,
        "Block": None,
    }
    signed = parse_signed_answer(_encode_answer(payload))
    assert signed is not None
    assert signed.product_id == 7
    assert signed.key == ""
    assert signed.max_machines is None
    assert signed.block is False
    assert signed.sign_date is None
    assert signed.expires is None
    assert signed.machines == (
        "node-locked",
        "floating:ws-1",
        "floating:overdraft:ws-2",
        "floating:ws-3",
        "floating:ws-4",
    )
    assert dict(signed.floating_expires) == {
        "floating:ws-1": 1700000600,
        "floating:overdraft:ws-2": 1700000900,
    }
    for machine in ("node-locked", "ws-1", "ws-2", "ws-3", "ws-4"):
        assert signed.matches_machine(machine), machine
    for machine in ("ws", "node", "ws-5", "floating:", "floating:overdraft:", ""):
        assert not signed.matches_machine(machine), machine
    with pytest.raises(TypeError):
        signed.floating_expires["x"] = 1  # type: ignore[index]
    assert hash(signed) == hash(parse_signed_answer(_encode_answer(payload)))


def test_parse_minimal_payload() -> None:
    signed = parse_signed_answer(_encode_answer({}))
    assert signed is not None
    assert (signed.product_id, signed.key, signed.machines, signed.block) == (None, "", (), False)


def test_signed_license_repr_is_short(vector_signed: SignedLicense) -> None:
    text = repr(vector_signed)
    assert vector_signed.license_key_b64 not in text
    assert "ETXYI-GFILQ-UXAXK-GGKSU" in text


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [
        "ProductId",
        "productid",
        "Key",
        "KEY",
        "Block",
        "SignDate",
        "Expires",
        "MaxNoOfMachines",
        "ActivatedMachines",
        "activatedmachines",
        "Mid",
        "FloatingExpires",
    ]
)
_machine_entries = st.lists(
    st.dictionaries(
        st.sampled_from(["Mid", "mid", "FloatingExpires", "IP", "Time"]), _json_values, max_size=4
    )
    | _json_values,
    max_size=4,
)
_payload_objects = st.dictionaries(
    _field_names | st.text(max_size=8), _json_values | _machine_entries, max_size=8
)
_b64_text = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(b64),
    _payload_objects.map(lambda p: b64(json.dumps(p).encode())),
    _json_values.map(lambda p: b64(json.dumps(p).encode())),
)
_answers = st.dictionaries(
    st.sampled_from(["licenseKey", "LicenseKey", "signature", "Signature", "result", "message", "metadata"])
    | st.text(max_size=10),
    _b64_text | _json_values,
    max_size=6,
)


@settings(max_examples=400)
@given(st.one_of(_answers, _json_values))
def test_parse_raises_only_answer_format_error(answer: Any) -> None:
    try:
        signed = parse_signed_answer(answer)
    except AnswerFormatError:
        return
    if signed is not None:
        assert isinstance(signed.payload, bytes)
        assert isinstance(signed.key, str)
        assert all(isinstance(mid, str) for mid in signed.machines)
        assert signed.product_id is None or type(signed.product_id) is int
        signed.matches_machine("x")


@given(_payload_objects)
def test_parse_well_encoded_payloads_raise_only_answer_format_error(payload: dict[str, Any]) -> None:
    answer = {"LicenseKey": b64(json.dumps(payload).encode()), "Signature": b64(b"sig")}
    try:
        signed = parse_signed_answer(answer)
    except AnswerFormatError:
        return
    assert signed is not None
    assert signed.payload == json.dumps(payload).encode()


# --- metadata ------------------------------------------------------------------------------------


def _metadata(private: rsa.RSAPrivateKey, data: bytes, *, sha512: bool = True) -> dict[str, Any]:
    """A metadata object as the upstream sends it with Metadata=true."""
    envelope = {
        "Data": b64(data),
        "Signature": b64(sign(private, data, sha512=sha512)),
        "Date": 1700000000,
        "Version": 1,
    }
    return {"signature": b64(json.dumps(envelope).encode())}


def _sdk_accepts(private: rsa.RSAPrivateKey, metadata: dict[str, Any]) -> bool:
    numbers = private.public_key().public_numbers()
    sdk_key = RSAPublicKey(int_b64(numbers.n), int_b64(numbers.e))
    verdict, _data = HelperMethods.verify_signature_metadata(metadata["signature"], sdk_key)
    return bool(verdict)


def test_metadata_verifies_and_sdk_agrees(private_key: rsa.RSAPrivateKey) -> None:
    data = json.dumps({"licenseStatus": {"isValid": True}, "activatedMachines": 1}).encode()
    metadata = _metadata(private_key, data)
    ring = KeyRing([PublicKey.from_rsa(private_key.public_key())])
    assert verify_metadata(ring, metadata)
    assert _sdk_accepts(private_key, metadata)
    assert verify_metadata(ring, {"Signature": metadata["signature"], "other": 1})


def test_metadata_rejections_agree_with_sdk(
    private_key: rsa.RSAPrivateKey, other_private_key: rsa.RSAPrivateKey
) -> None:
    ring = KeyRing([PublicKey.from_rsa(private_key.public_key())])
    data = b'{"x":1}'
    sha256_signed = _metadata(private_key, data, sha512=False)
    foreign = _metadata(other_private_key, data)
    envelope = json.loads(base64.b64decode(_metadata(private_key, data)["signature"]))
    envelope["Data"] = b64(b'{"x":2}')
    tampered = {"signature": b64(json.dumps(envelope).encode())}
    for metadata in (sha256_signed, foreign, tampered):
        assert not verify_metadata(ring, metadata)
        assert not _sdk_accepts(private_key, metadata)


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"signature": None},
        {"signature": 5},
        {"signature": "not base64!"},
        {"signature": b64(b"\xff\xfe")},
        {"signature": b64(b"not json")},
        {"signature": b64(b"[1]")},
        {"signature": b64(b'{"Data":"eyJ9"}')},
        {"signature": b64(b'{"Data":5,"Signature":"AAAA"}')},
        {"signature": b64(b'{"Data":"!!","Signature":"AAAA"}')},
        {"signature": b64(b'{"data":"eyJ9","signature":"AAAA"}')},
        {"signature": b64(b"[" * 100000)},
        {"signature": "x", "Signature": "y"},
    ],
)
def test_metadata_malformed_is_false(private_key: rsa.RSAPrivateKey, metadata: dict[str, Any]) -> None:
    assert not verify_metadata(KeyRing([PublicKey.from_rsa(private_key.public_key())]), metadata)


@given(_json_values)
def test_metadata_never_raises(metadata: Any) -> None:
    assert verify_metadata(KeyRing([]), metadata) is False

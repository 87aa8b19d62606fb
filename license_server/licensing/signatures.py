"""Vendor public keys and verification of Cryptolens-signed answers, license payloads and metadata."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "AnswerFormatError",
    "KeyFormatError",
    "KeyRing",
    "PublicKey",
    "SignedLicense",
    "load_public_key",
    "parse_signed_answer",
    "verify_metadata",
    "verify_signed",
]

MIN_KEY_BITS = 1024
MAX_KEY_BITS = 16384
_FINGERPRINT_HEX_CHARS = 16
_MAX_KEY_TEXT_CHARS = 64 * 1024
_PRIVATE_XML_PARTS = frozenset({"P", "Q", "DP", "DQ", "InverseQ", "D"})
_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_WHITESPACE = re.compile(r"\s+")
# How Cryptolens lists a floating activation among ActivatedMachines: the machine code behind a prefix.
_FLOATING = "floating:"
_OVERDRAFT = "floating:overdraft:"  # a seat taken beyond the limit, as MaxOverdraft allows


class KeyFormatError(ValueError):
    """A vendor public key that cannot be read."""


class AnswerFormatError(ValueError):
    """A signed answer that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One vendor RSA public key that checks upstream signatures."""

    fingerprint: str
    rsa_key: rsa.RSAPublicKey = field(repr=False, compare=False)
    modulus: int = field(repr=False)
    exponent: int = field(repr=False)

    @classmethod
    def from_rsa(cls, key: rsa.RSAPublicKey) -> PublicKey:
        """Wrap a `cryptography` RSA public key, computing its fingerprint."""
        numbers = key.public_numbers()
        return cls(_fingerprint(numbers.n), key, numbers.n, numbers.e)

    @property
    def key_size(self) -> int:
        """The modulus length in bits."""
        return self.rsa_key.key_size

    def verify(self, message: bytes, signature: bytes, *, sha512: bool = False) -> bool:
        """Whether `signature` is an RSASSA-PKCS1-v1_5 signature of `message` (SHA-256, or SHA-512)."""
        sig = _normalise_signature(signature, self.modulus)
        if sig is None:
            return False
        algorithm: hashes.HashAlgorithm = hashes.SHA512() if sha512 else hashes.SHA256()
        try:
            self.rsa_key.verify(sig, message, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            return False
        return True


def _fingerprint(modulus: int) -> str:
    """A short hex SHA-256 of the unsigned big-endian modulus, the same whatever form the key came in."""
    raw = modulus.to_bytes((modulus.bit_length() + 7) // 8, "big")
    return hashlib.sha256(raw).hexdigest()[:_FINGERPRINT_HEX_CHARS]


def _normalise_signature(signature: bytes, modulus: int) -> bytes | None:
    """The signature as a modulus-length octet string, or None if it cannot be one."""
    size = (modulus.bit_length() + 7) // 8
    if len(signature) == size:
        return signature
    # The SDKs read the signature as an integer (OS2IP), so a copy that lost or gained leading
    # zero bytes still verifies there; OpenSSL insists on the exact length, so restore it.
    value = int.from_bytes(signature, "big")
    if not signature or value >= modulus:
        return None
    return value.to_bytes(size, "big")


def load_public_key(text: str) -> PublicKey:
    """Read a vendor key given as the dashboard's <RSAKeyValue> XML or as PEM (SPKI or PKCS#1)."""
    stripped = text.strip().lstrip("\ufeff").strip()
    if not stripped:
        raise KeyFormatError("the public key is empty")
    if len(stripped) > _MAX_KEY_TEXT_CHARS:
        raise KeyFormatError(f"the public key is {len(stripped)} characters long; that is not a public key")
    if stripped.startswith("-----BEGIN"):
        key = _load_pem(stripped)
    elif stripped.startswith("<"):
        key = _load_xml(stripped)
    else:
        raise KeyFormatError(
            "the public key is neither <RSAKeyValue><Modulus>...</Modulus><Exponent>...</Exponent>"
            f"</RSAKeyValue> XML nor PEM; it starts with {stripped[:20]!r}"
        )
    bits = key.key_size
    if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
        raise KeyFormatError(
            f"the RSA key has {bits} bits; only {MIN_KEY_BITS} to {MAX_KEY_BITS} bits are accepted"
        )
    return PublicKey.from_rsa(key)


def _load_pem(text: str) -> rsa.RSAPublicKey:
    """Read a PEM public key, refusing private keys and non-RSA keys with a clear message."""
    match = _PEM_LABEL.match(text)
    label = match.group(1) if match else "?"
    if "PRIVATE" in label:
        raise KeyFormatError(
            f"the PEM block is a {label}; configure the vendor's public key, never the private key"
        )
    if label not in {"PUBLIC KEY", "RSA PUBLIC KEY"}:
        raise KeyFormatError(
            f"the PEM block is labelled {label!r}; expected 'PUBLIC KEY' or 'RSA PUBLIC KEY'"
        )
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"the PEM {label} cannot be read: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFormatError(f"the PEM key is a {type(key).__name__}, not an RSA key")
    return key


def _load_xml(text: str) -> rsa.RSAPublicKey:
    """Read the .NET <RSAKeyValue> form, refusing DOCTYPE, entities and private-key parts."""
    if "<!" in text:
        raise KeyFormatError("the XML key contains a DOCTYPE, entity, comment or CDATA section; refused")
    try:
        root = ET.fromstring(text)  # noqa: S314 -- "<!" refused above, so no DTD and no entity expansion
    except ET.ParseError as exc:
        raise KeyFormatError(f"the XML key is not well-formed: {exc}") from exc
    if _local_name(root.tag) != "RSAKeyValue":
        raise KeyFormatError(f"the XML root element is <{_local_name(root.tag)}>, expected <RSAKeyValue>")
    parts: dict[str, str] = {}
    for child in root:
        name = _local_name(child.tag)
        if name in _PRIVATE_XML_PARTS:
            raise KeyFormatError(
                f"the XML key contains <{name}>, a private-key part; configure only the public key "
                "(<Modulus> and <Exponent>)"
            )
        if name not in {"Modulus", "Exponent"}:
            raise KeyFormatError(f"unexpected element <{name}> in <RSAKeyValue>")
        if name in parts:
            raise KeyFormatError(f"<{name}> appears twice in <RSAKeyValue>")
        if len(child):
            raise KeyFormatError(f"<{name}> must contain only base64 text")
        parts[name] = child.text or ""
    if (root.text or "").strip() or any((child.tail or "").strip() for child in root):
        raise KeyFormatError("<RSAKeyValue> contains text outside <Modulus> and <Exponent>")
    modulus = _xml_integer(parts, "Modulus")
    exponent = _xml_integer(parts, "Exponent")
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise KeyFormatError(f"the <Modulus> and <Exponent> do not form a valid RSA key: {exc}") from exc


def _local_name(tag: str) -> str:
    """An element name without its {namespace} (the XMLDSig form of RSAKeyValue carries one)."""
    return tag.rpartition("}")[2]


def _xml_integer(parts: Mapping[str, str], name: str) -> int:
    """The unsigned big-endian integer carried as base64 in element `name`."""
    if name not in parts:
        raise KeyFormatError(f"the XML key has no <{name}> element")
    b64 = _WHITESPACE.sub("", parts[name])
    if not b64:
        raise KeyFormatError(f"<{name}> is empty")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"<{name}> is not valid base64: {exc}") from exc
    value = int.from_bytes(raw, "big")
    if value == 0:
        raise KeyFormatError(f"<{name}> is zero")
    return value


def load_keyring(texts: Iterable[str]) -> KeyRing:
    """Parse vendor public keys (each XML, PEM, or a path to a file holding either) into a key ring."""
    return KeyRing([load_public_key(text) for text in texts])


class KeyRing:
    """The configured vendor public keys; a signature is good if any of them verifies it."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        self._keys: tuple[PublicKey, ...] = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing({[key.fingerprint for key in self._keys]!r})"

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """The fingerprints of the keys, for logs."""
        return tuple(key.fingerprint for key in self._keys)

    def verify(self, message: bytes, signature: bytes, *, sha512: bool = False) -> bool:
        """Whether any configured key verifies `signature` over `message`."""
        return any(key.verify(message, signature, sha512=sha512) for key in self._keys)


@dataclass(frozen=True, slots=True)
class SignedLicense:
    """A signed license as received (exact strings and signed bytes) plus the fields the daemon uses."""

    license_key_b64: str = field(repr=False)
    signature_b64: str = field(repr=False)
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    product_id: int | None
    key: str
    machines: tuple[str, ...]
    floating_expires: Mapping[str, int] = field(hash=False)
    max_machines: int | None
    block: bool
    sign_date: int | None
    expires: int | None
    features: tuple[bool, ...] = ()  # F1..F8 as signed; a flag the license does not carry reads False

    def matches_machine(self, machine_code: str) -> bool:
        """Whether the license lists `machine_code` as a node-locked or floating activation."""
        if not machine_code:
            return False
        wanted = {machine_code, _FLOATING + machine_code, _OVERDRAFT + machine_code}
        return any(mid in wanted for mid in self.machines)

    def floating_lease(self, machine_code: str) -> tuple[int, bool] | None:
        """When the machine's floating activation expires (upstream's time) and whether it is an overdraft."""
        for prefix, overdraft in ((_OVERDRAFT, True), (_FLOATING, False)):
            expires = self.floating_expires.get(prefix + machine_code)
            if expires is not None:
                return expires, overdraft
        return None


def runway_facts(signed: SignedLicense, machine_code: str, body: bytes) -> str:
    """What a kept Activate answer's runway needs, as stored beside it (reports/runway.py reads it back).

    JSON: [the first 16 hex digits of the body's SHA-256, SignDate, Expires, F1..F8 as bits (F1 lowest),
    whether the machine is listed as floating]. The digest ties the facts to the body they were read from:
    a row whose body another writer replaced (a node of an earlier version) is read from its body again.
    """
    bits = sum(1 << index for index, flag in enumerate(signed.features) if flag)
    floating = signed.floating_lease(machine_code) is not None
    digest = hashlib.sha256(body).hexdigest()[:16]
    return orjson.dumps([digest, signed.sign_date, signed.expires, bits, floating]).decode()


def _casefold_fields(obj: Mapping[Any, Any], what: str) -> dict[str, Any]:
    """The object's string-keyed fields under lower-case names; conflicting duplicates are an error."""
    out: dict[str, Any] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            continue
        lower = name.lower()
        if lower in out and out[lower] != value:
            raise AnswerFormatError(f"{what} has the field {name!r} twice with different values")
        out[lower] = value
    return out


def _b64(value: str, what: str) -> bytes:
    """Strictly decode base64 text, raising AnswerFormatError."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AnswerFormatError(f"{what} is not valid base64: {exc}") from exc


def _int_field(fields: Mapping[str, Any], name: str) -> int | None:
    """An optional integer field of the license payload (bool is not an integer here)."""
    value = fields.get(name.lower())
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnswerFormatError(f"the license field {name} is {type(value).__name__}, expected an integer")
    return value


def parse_signed_answer(answer: Mapping[str, Any]) -> SignedLicense | None:
    """Decode the signed license in an Activate/GetKey answer or .skm file; None if it carries none."""
    received: object = answer  # callers pass parsed JSON, which may be any JSON value
    if not isinstance(received, Mapping):
        raise AnswerFormatError(f"the answer is a JSON {type(received).__name__}, not an object")
    outer = _casefold_fields(received, "the answer")
    license_key_b64 = outer.get("licensekey")
    signature_b64 = outer.get("signature")
    # Legacy SignMethod=0 answers carry the license as a JSON object; they are recognised, not parsed.
    if isinstance(license_key_b64, Mapping) or license_key_b64 in (None, "") or signature_b64 in (None, ""):
        return None
    if not isinstance(license_key_b64, str):
        raise AnswerFormatError(f"licenseKey is a JSON {type(license_key_b64).__name__}, expected a string")
    if not isinstance(signature_b64, str):
        raise AnswerFormatError(f"signature is a JSON {type(signature_b64).__name__}, expected a string")
    payload = _b64(license_key_b64, "licenseKey")
    signature = _b64(signature_b64, "signature")
    try:
        decoded = orjson.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AnswerFormatError(f"the decoded licenseKey is not UTF-8: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise AnswerFormatError(f"the decoded licenseKey is not JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise AnswerFormatError(f"the decoded licenseKey is a JSON {type(decoded).__name__}, not an object")
    fields = _casefold_fields(decoded, "the license")

    key = fields.get("key")
    if key is None:
        key = ""
    elif not isinstance(key, str):
        raise AnswerFormatError(f"the license field Key is {type(key).__name__}, expected a string")
    block = fields.get("block")
    if block is None:
        block = False
    elif not isinstance(block, bool):
        raise AnswerFormatError(f"the license field Block is {type(block).__name__}, expected a boolean")
    machines, floating = _machines(fields.get("activatedmachines"))
    return SignedLicense(
        license_key_b64=license_key_b64,
        signature_b64=signature_b64,
        payload=payload,
        signature=signature,
        product_id=_int_field(fields, "ProductId"),
        key=key,
        machines=machines,
        floating_expires=MappingProxyType(floating),
        max_machines=_int_field(fields, "MaxNoOfMachines"),
        block=block,
        sign_date=_int_field(fields, "SignDate"),
        expires=_int_field(fields, "Expires"),
        features=tuple(fields.get(f"f{n}") is True for n in range(1, 9)),
    )


def _machines(value: Any) -> tuple[tuple[str, ...], dict[str, int]]:
    """The Mids of ActivatedMachines and the FloatingExpires of those that have one."""
    if value is None:
        return (), {}
    if not isinstance(value, list):
        raise AnswerFormatError(f"ActivatedMachines is a JSON {type(value).__name__}, expected an array")
    mids: list[str] = []
    floating: dict[str, int] = {}
    for entry in value:
        if not isinstance(entry, Mapping):
            raise AnswerFormatError(f"an ActivatedMachines entry is a JSON {type(entry).__name__}")
        machine = _casefold_fields(entry, "an ActivatedMachines entry")
        mid = machine.get("mid")
        if not isinstance(mid, str):
            raise AnswerFormatError(f"an ActivatedMachines Mid is {type(mid).__name__}, expected a string")
        mids.append(mid)
        expires = machine.get("floatingexpires")
        if expires is None:
            continue
        if isinstance(expires, bool) or not isinstance(expires, int):
            raise AnswerFormatError(
                f"FloatingExpires of {mid!r} is {type(expires).__name__}, expected an integer"
            )
        if expires > 0:
            floating[mid] = expires
    return tuple(mids), floating


def verify_signed(keyring: KeyRing, signed: SignedLicense) -> bool:
    """Whether a configured vendor key signed this license's exact payload bytes."""
    return keyring.verify(signed.payload, signed.signature)


def verify_metadata(keyring: KeyRing, metadata: Mapping[str, Any]) -> bool:
    """Whether the answer's metadata object carries a good SHA-512 signature; False on any malformation."""
    received: object = metadata  # parsed JSON, which may be any JSON value
    if not isinstance(received, Mapping):
        return False
    try:
        outer = _casefold_fields(received, "metadata")
    except AnswerFormatError:
        return False
    wrapped = outer.get("signature")
    if not isinstance(wrapped, str):
        return False
    try:
        envelope = json.loads(base64.b64decode(wrapped, validate=True).decode("utf-8"))
        if not isinstance(envelope, dict):
            return False
        # The SDK reads exactly "Data" and "Signature"; accepting other spellings would disagree with it.
        data_b64, signature_b64 = envelope.get("Data"), envelope.get("Signature")
        if not isinstance(data_b64, str) or not isinstance(signature_b64, str):
            return False
        data = base64.b64decode(data_b64, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, RecursionError):  # binascii.Error, UnicodeDecodeError and JSONDecodeError too
        return False
    return keyring.verify(data, signature, sha512=True)

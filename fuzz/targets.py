"""Atheris fuzz targets: the daemon's readers of hostile input, each with the property it must keep."""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["license_server"]):
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
        load_public_key,
        parse_signed_answer,
        verify_metadata,
        verify_signed,
    )

from tests.fake_upstream import FakeCryptolens  # noqa: E402 -- after the instrumented imports

DATA = ROOT / "tests" / "data"
VECTOR_SKM = (DATA / "cryptolens-example-2019.skm").read_bytes()
VECTOR_KEY = (DATA / "cryptolens-example-2019.pubkey.xml").read_text()
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz0123456789/")


def fuzz_path(data: bytes) -> None:
    """normalise_path: None or `controller/method` in ASCII letters and digits, a fixed point, no raise."""
    path = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    method = normalise_path(path)
    if method is None:
        return
    assert set(method) <= _ALLOWED, method
    assert method.count("/") == 1, method
    assert "" not in method.split("/"), method
    assert normalise_path("/api/" + method) == method, method
    segments = [segment for segment in path.split("/") if segment]
    assert len(segments) == 3, path
    assert segments[0].lower() == "api", path


def fuzz_form(data: bytes) -> None:
    """parse_fields: unique lower-case names or RequestError 400; never any other exception."""
    provider = atheris.FuzzedDataProvider(data)
    form = provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 400))
    query = provider.ConsumeUnicodeNoSurrogates(200)
    try:
        fields = parse_fields(form, query)
    except RequestError as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.status == 400, refused.status
        return
    assert all(name == name.lower() for name in fields), fields
    expected = (len(form_pairs(form)) if form else 0) + (len(form_pairs(query)) if query else 0)
    assert len(fields) == expected, (form, query)
    Call.from_fields("key/activate", fields).cache_key(TokenFingerprints(b"\x01" * 32))


def fuzz_answer(data: bytes) -> None:
    """parse_answer (every upstream body): an answer with an integer result, or None; never raises."""
    answer = parse_answer(data)
    assert answer is None or (isinstance(answer.result, int) and not isinstance(answer.result, bool))


class _Signing:
    """A vendor key, a signed answer and a valid license file, made once per process."""

    def __init__(self) -> None:
        self.fake = FakeCryptolens()
        lic = self.fake.add_license(3349, "MUYVD-LSEBY-CXHRQ-XFAGY", max_machines=3)
        self.answer = json.loads(self.fake.sign_answer(lic, metadata=True))
        self.files = [VECTOR_SKM, self.fake.license_file(lic).encode()]
        self.keyring = KeyRing([load_public_key(self.fake.public_key_xml), load_public_key(VECTOR_KEY)])
        self.folder = Path(tempfile.mkdtemp(prefix="fuzz-license-files-"))


_signing: _Signing | None = None


def signing() -> _Signing:
    """The shared signing material (made on first use: key generation takes a moment)."""
    global _signing  # one per fuzzing process
    if _signing is None:
        _signing = _Signing()
    return _signing


def _flip(b64: str, provider: atheris.FuzzedDataProvider) -> str:
    """The base64 text of the decoded bytes with one to three bits flipped."""
    raw = bytearray(base64.b64decode(b64))
    for _ in range(provider.ConsumeIntInRange(1, 3)):
        raw[provider.ConsumeIntInRange(0, len(raw) - 1)] ^= 1 << provider.ConsumeIntInRange(0, 7)
    return base64.b64encode(bytes(raw)).decode()


def fuzz_signature(data: bytes) -> None:
    """Flipped bits in licenseKey, signature or metadata never verify; arbitrary JSON never verifies."""
    material = signing()
    provider = atheris.FuzzedDataProvider(data)
    choice = provider.ConsumeIntInRange(0, 3)
    if choice == 3:
        try:
            answer = json.loads(provider.ConsumeUnicodeNoSurrogates(len(data)))
        except (ValueError, RecursionError):
            return
    else:
        answer = json.loads(json.dumps(material.answer))
        if choice == 2:
            envelope = json.loads(base64.b64decode(answer["metadata"]["signature"]))
            part = "Data" if provider.ConsumeBool() else "Signature"
            original = envelope[part]
            envelope[part] = _flip(original, provider)
            if envelope[part] == original:
                return  # the same bit flipped back
            answer["metadata"]["signature"] = base64.b64encode(json.dumps(envelope).encode()).decode()
            assert not verify_metadata(material.keyring, answer["metadata"])
            return
        field = "licenseKey" if choice == 0 else "signature"
        answer[field] = _flip(answer[field], provider)
        if answer[field] == material.answer[field]:
            return  # the same bit flipped back
    try:
        signed = parse_signed_answer(answer)
    except AnswerFormatError:
        return
    if signed is not None:
        assert not verify_signed(material.keyring, signed), answer
    assert not verify_metadata(material.keyring, answer)


def fuzz_license_file(data: bytes) -> None:
    """LicenseFiles.load: never raises; a file it accepts carries exactly the signed bytes of a valid one."""
    material = signing()
    provider = atheris.FuzzedDataProvider(data)
    if provider.ConsumeBool():
        raw = bytearray(material.files[provider.ConsumeIntInRange(0, len(material.files) - 1)])
        for _ in range(provider.ConsumeIntInRange(1, 4)):
            at = provider.ConsumeIntInRange(0, len(raw) - 1)
            raw[at] = provider.ConsumeIntInRange(0, 255)
    else:
        raw = bytearray(provider.ConsumeBytes(len(data)))
    (material.folder / "license.skm").write_bytes(bytes(raw))
    files, problems = LicenseFiles.load(material.folder, material.keyring)
    loaded = list(files)
    assert len(loaded) + len(problems) == 1
    if loaded:
        originals = {
            (signed.payload, int.from_bytes(signed.signature, "big"))
            for signed in (parse_signed_answer(json.loads(raw_file)) for raw_file in material.files)
            if signed is not None
        }
        got = loaded[0].signed
        assert (got.payload, int.from_bytes(got.signature, "big")) in originals, bytes(raw)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "path": fuzz_path,
    "form": fuzz_form,
    "answer": fuzz_answer,
    "signature": fuzz_signature,
    "license_file": fuzz_license_file,
}

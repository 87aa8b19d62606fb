"""Tests for loading, checking and indexing offline .skm license files."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from licensing.models import LicenseKey

from license_server.licensing.license_files import MAX_FILE_BYTES, FileProblem, LicenseFile, LicenseFiles
from license_server.licensing.signatures import KeyRing, PublicKey, load_public_key

DATA = Path(__file__).parent / "data"
VECTOR_SKM = DATA / "cryptolens-example-2019.skm"
VECTOR_KEY_XML = (DATA / "cryptolens-example-2019.pubkey.xml").read_text()
VECTOR_PRODUCT = 3941
VECTOR_KEY = "ETXYI-GFILQ-UXAXK-GGKSU"
VECTOR_SIGN_DATE = 1551715310
OWN_PRODUCT = 77
OWN_KEY = "AAAAA-BBBBB-CCCCC-DDDDD"


def b64(raw: bytes) -> str:
    """Standard base64 text, as the upstream writes it."""
    return base64.b64encode(raw).decode("ascii")


def xml_key(key: rsa.RSAPublicKey) -> str:
    """The dashboard's XML form of a public key."""
    numbers = key.public_numbers()
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return f"<RSAKeyValue><Modulus>{b64(modulus)}</Modulus><Exponent>{b64(exponent)}</Exponent></RSAKeyValue>"


def license_payload(
    *, product: int = OWN_PRODUCT, key: str = OWN_KEY, machines: list[dict[str, Any]], sign_date: int
) -> bytes:
    """A license object in the upstream's field order and compact form, complete enough for the SDK."""
    fields: dict[str, Any] = {
        "ProductId": product,
        "ID": 1,
        "Key": key,
        "Created": 1700000000,
        "Expires": 1900000000,
        "Period": 30,
        **{f"F{i}": False for i in range(1, 9)},
        "Notes": "",
        "Block": False,
        "GlobalId": 1,
        "Customer": None,
        "ActivatedMachines": [{"IP": "10.0.0.1", "Time": 1700000000, **m} for m in machines],
        "TrialActivation": False,
        "MaxNoOfMachines": 2,
        "AllowedMachines": "",
        "DataObjects": [],
        "SignDate": sign_date,
    }
    return json.dumps(fields, separators=(",", ":")).encode()


def signed_file(private: rsa.RSAPrivateKey, payload: bytes, *, pascal: bool = False) -> str:
    """The text of an .skm file carrying `payload` signed by `private`."""
    signature = private.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    if pascal:
        return json.dumps({"LicenseKey": b64(payload), "Signature": b64(signature)})
    return json.dumps({"licenseKey": b64(payload), "signature": b64(signature), "result": 0, "message": ""})


@pytest.fixture(scope="module")
def own_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def stranger_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keyring(own_private: rsa.RSAPrivateKey) -> KeyRing:
    return KeyRing([load_public_key(VECTOR_KEY_XML), PublicKey.from_rsa(own_private.public_key())])


@pytest.fixture
def folder(tmp_path: Path, own_private: rsa.RSAPrivateKey, stranger_private: rsa.RSAPrivateKey) -> Path:
    """A license folder holding good, bad and irrelevant files."""
    root = tmp_path / "licenses"
    root.mkdir()
    vector = json.loads(VECTOR_SKM.read_text())
    shutil.copy(VECTOR_SKM, root / "vector.skm")
    (root / "vector-pascal.SKM").write_text(
        json.dumps({"LicenseKey": vector["licenseKey"], "Signature": vector["signature"]}, indent=2)
    )
    (root / "garbage.skm").write_bytes(b"\x00\x01 this is not json \xff")
    payload = bytearray(base64.b64decode(vector["licenseKey"]))
    payload[payload.index(b'"test"') + 1] = ord("T")  # the machine "test" becomes "Test"
    (root / "tampered.skm").write_text(json.dumps({**vector, "licenseKey": b64(bytes(payload))}))
    (root / "stranger.skm").write_text(
        signed_file(stranger_private, license_payload(machines=[{"Mid": "ws-1"}], sign_date=300))
    )
    (root / "legacy.skm").write_text(
        json.dumps(
            {
                "LicenseKey": {"ProductId": VECTOR_PRODUCT, "Key": VECTOR_KEY, "Signature": "abc=="},
                "Result": 0,
                "Message": "",
            }
        )
    )
    (root / "error.skm").write_text(json.dumps({"result": 1, "message": "Could not find the key."}))
    (root / "array.skm").write_text("[1, 2, 3]")
    (root / "badfield.skm").write_text(json.dumps({"licenseKey": "!!!", "signature": "AAAA"}))
    (root / "own-old.skm").write_text(
        signed_file(
            own_private,
            license_payload(machines=[{"Mid": "ws-1"}, {"Mid": "ws-old"}], sign_date=100),
        )
    )
    (root / "own-new.skm").write_text(
        signed_file(
            own_private,
            license_payload(
                machines=[{"Mid": "ws-1"}, {"Mid": "floating:ws-f", "FloatingExpires": 1900000000}],
                sign_date=200,
            ),
            pascal=True,
        )
    )
    (root / "notes.txt").write_text("not a license file")
    (root / "vector.skm.bak").write_text(VECTOR_SKM.read_text())
    (root / "sub").mkdir()
    shutil.copy(VECTOR_SKM, root / "sub" / "nested.skm")
    return root


PROBLEM_FILES = {
    "garbage.skm": "not UTF-8",
    "tampered.skm": "signature does not verify with any configured vendor key",
    "stranger.skm": "signature does not verify with any configured vendor key",
    "legacy.skm": "legacy SignMethod=0",
    "error.skm": "Could not find the key.",
    "array.skm": "not an object",
    "badfield.skm": "not valid base64",
}


def _problems(problems: list[FileProblem]) -> dict[str, str]:
    return {problem.path.name: problem.reason for problem in problems}


def test_good_files_indexed_and_bad_ones_reported(folder: Path, keyring: KeyRing) -> None:
    files, problems = LicenseFiles.load(folder, keyring)
    reported = _problems(problems)
    assert set(reported) == set(PROBLEM_FILES)
    for name, fragment in PROBLEM_FILES.items():
        assert fragment in reported[name], (name, reported[name])
    assert all(problem.path.parent == folder for problem in problems)
    assert len(files) == 4
    assert {file.path.name for file in files} == {
        "vector.skm",
        "vector-pascal.SKM",
        "own-old.skm",
        "own-new.skm",
    }
    assert all(file.path.parent == folder for file in files)


def test_vector_found_for_activate_and_getkey(folder: Path, keyring: KeyRing) -> None:
    files, _ = LicenseFiles.load(folder, keyring)
    found = files.for_activate(str(VECTOR_PRODUCT), VECTOR_KEY, "test")
    assert found is not None
    assert found.path.name in {"vector.skm", "vector-pascal.SKM"}
    assert found.signed.sign_date == VECTOR_SIGN_DATE
    assert files.for_getkey(VECTOR_PRODUCT, VECTOR_KEY) is not None
    # product as a string or integer, key in any case and with surrounding whitespace
    for product in ("3941", " 3941 ", "03941", 3941):
        for key in (VECTOR_KEY, VECTOR_KEY.lower(), f"  {VECTOR_KEY}\n"):
            assert files.for_activate(product, key, "test") is not None, (product, key)
            assert files.for_getkey(product, key) is not None, (product, key)


@pytest.mark.parametrize(
    ("product", "key", "machine"),
    [
        ("3941", VECTOR_KEY, "Test"),
        ("3941", VECTOR_KEY, "other"),
        ("3941", VECTOR_KEY, ""),
        ("3942", VECTOR_KEY, "test"),
        ("3941", "ETXYI-GFILQ-UXAXK-GGKSV", "test"),
        ("3941", "", "test"),
        ("abc", VECTOR_KEY, "test"),
        ("", VECTOR_KEY, "test"),
        ("3_941", VECTOR_KEY, "test"),
        ("+3941", VECTOR_KEY, "test"),
        ("3941.0", VECTOR_KEY, "test"),
        ("٣٩٤١", VECTOR_KEY, "test"),  # Arabic-Indic digits, which int() would accept
    ],
)
def test_no_match(folder: Path, keyring: KeyRing, product: str, key: str, machine: str) -> None:
    files, _ = LicenseFiles.load(folder, keyring)
    assert files.for_activate(product, key, machine) is None
    if machine == "test":
        assert files.for_getkey(product, key) is None


def test_newest_file_wins(folder: Path, keyring: KeyRing) -> None:
    files, _ = LicenseFiles.load(folder, keyring)
    newest = files.for_getkey(OWN_PRODUCT, OWN_KEY)
    assert newest is not None
    assert newest.path.name == "own-new.skm"
    both = files.for_activate(OWN_PRODUCT, OWN_KEY, "ws-1")
    assert both is not None
    assert both.path.name == "own-new.skm"
    only_old = files.for_activate(str(OWN_PRODUCT), OWN_KEY.lower(), "ws-old")
    assert only_old is not None
    assert only_old.path.name == "own-old.skm"
    floating = files.for_activate(OWN_PRODUCT, OWN_KEY, "ws-f")
    assert floating is not None
    assert floating.path.name == "own-new.skm"
    assert dict(floating.signed.floating_expires) == {"floating:ws-f": 1900000000}
    assert files.for_activate(OWN_PRODUCT, OWN_KEY, "ws-unknown") is None


def _expected_body(file: LicenseFile) -> bytes:
    return (
        b'{"licenseKey":"'
        + file.signed.license_key_b64.encode()
        + b'","signature":"'
        + file.signed.signature_b64.encode()
        + b'","result":0,"message":""}'
    )


def test_body_is_exact_and_loads_with_the_sdk(
    folder: Path, keyring: KeyRing, own_private: rsa.RSAPrivateKey
) -> None:
    files, _ = LicenseFiles.load(folder, keyring)
    vector = json.loads(VECTOR_SKM.read_text())
    by_name = {file.path.name: file for file in files}
    for name in ("vector.skm", "vector-pascal.SKM"):
        file = by_name[name]
        assert file.body == _expected_body(file)
        assert json.loads(file.body)["licenseKey"] == vector["licenseKey"]
        assert json.loads(file.body)["signature"] == vector["signature"]
        loaded = LicenseKey.load_from_string(VECTOR_KEY_XML, file.body.decode())
        assert loaded is not None, name
        assert loaded.product_id == VECTOR_PRODUCT
        assert loaded.key == VECTOR_KEY
        # The 2019 signature is old: a maximum age rejects it, as it should.
        assert LicenseKey.load_from_string(VECTOR_KEY_XML, file.body.decode(), 30) is None
    own_xml = xml_key(own_private.public_key())
    for name in ("own-old.skm", "own-new.skm"):
        file = by_name[name]
        assert file.body == _expected_body(file)
        loaded = LicenseKey.load_from_string(own_xml, file.body.decode())
        assert loaded is not None, name
        assert loaded.key == OWN_KEY
        assert LicenseKey.load_from_string(VECTOR_KEY_XML, file.body.decode()) is None


def test_sdk_rejects_a_pascal_file_without_result(folder: Path) -> None:
    # Why the daemon serves a rebuilt body rather than the file: the SDK needs "result".
    assert LicenseKey.load_from_string(VECTOR_KEY_XML, (folder / "vector-pascal.SKM").read_text()) is None


def test_missing_folder(tmp_path: Path, keyring: KeyRing) -> None:
    missing = tmp_path / "nowhere"
    files, problems = LicenseFiles.load(missing, keyring)
    assert len(files) == 0
    assert problems == [FileProblem(missing, "the license file folder does not exist")]
    assert files.for_getkey(VECTOR_PRODUCT, VECTOR_KEY) is None


def test_folder_is_a_file(tmp_path: Path, keyring: KeyRing) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    files, problems = LicenseFiles.load(not_a_folder, keyring)
    assert len(files) == 0
    assert [p.reason for p in problems] == ["the license file folder is not a directory"]


def test_no_folder_configured(keyring: KeyRing) -> None:
    files, problems = LicenseFiles.load(None, keyring)
    assert len(files) == 0
    assert problems == []
    assert files.for_activate("3941", VECTOR_KEY, "test") is None


def test_empty_keyring_reports_every_signed_file(folder: Path) -> None:
    files, problems = LicenseFiles.load(folder, KeyRing([]))
    assert len(files) == 0
    reported = _problems(problems)
    assert "no vendor public key" in reported["vector.skm"]
    assert "legacy" in reported["legacy.skm"]


def test_only_the_vector_key(folder: Path) -> None:
    files, problems = LicenseFiles.load(folder, KeyRing([load_public_key(VECTOR_KEY_XML)]))
    assert {file.path.name for file in files} == {"vector.skm", "vector-pascal.SKM"}
    reported = _problems(problems)
    assert "does not verify" in reported["own-old.skm"]
    assert "does not verify" in reported["own-new.skm"]


def test_large_file_skipped(tmp_path: Path, keyring: KeyRing) -> None:
    vector = json.loads(VECTOR_SKM.read_text())
    big = json.dumps({**vector, "padding": "x" * MAX_FILE_BYTES})
    (tmp_path / "big.skm").write_text(big)
    shutil.copy(VECTOR_SKM, tmp_path / "ok.skm")
    files, problems = LicenseFiles.load(tmp_path, keyring)
    assert [file.path.name for file in files] == ["ok.skm"]
    assert [(p.path.name, "larger than" in p.reason) for p in problems] == [("big.skm", True)]


def test_just_under_the_limit_is_read(tmp_path: Path, keyring: KeyRing) -> None:
    vector = json.loads(VECTOR_SKM.read_text())
    text = json.dumps(vector)
    padded = text[:-1] + ', "padding": "' + "x" * (MAX_FILE_BYTES - len(text) - 16) + '"}'
    assert len(padded.encode()) <= MAX_FILE_BYTES
    (tmp_path / "padded.skm").write_text(padded)
    files, problems = LicenseFiles.load(tmp_path, keyring)
    assert problems == []
    assert len(files) == 1


def test_symlinks_followed_only_inside_the_folder(tmp_path: Path, keyring: KeyRing) -> None:
    root = tmp_path / "licenses"
    (root / "store").mkdir(parents=True)
    outside = tmp_path / "outside.skm"
    shutil.copy(VECTOR_SKM, outside)
    shutil.copy(VECTOR_SKM, root / "store" / "real.json")
    (root / "inside.skm").symlink_to(root / "store" / "real.json")
    (root / "relative.skm").symlink_to(Path("store") / "real.json")
    (root / "escape.skm").symlink_to(outside)
    (root / "dotdot.skm").symlink_to(Path("..") / "outside.skm")
    (root / "dangling.skm").symlink_to(root / "missing.skm")
    (root / "loop.skm").symlink_to(root / "loop.skm")
    files, problems = LicenseFiles.load(root, keyring)
    assert sorted(file.path.name for file in files) == ["inside.skm", "relative.skm"]
    reported = _problems(problems)
    assert set(reported) == {"escape.skm", "dotdot.skm", "dangling.skm", "loop.skm"}
    assert "outside the license file folder" in reported["escape.skm"]
    assert "outside the license file folder" in reported["dotdot.skm"]
    assert "cannot be opened" in reported["dangling.skm"]


def test_folder_given_through_a_symlink(tmp_path: Path, keyring: KeyRing) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(VECTOR_SKM, real / "vector.skm")
    link = tmp_path / "link"
    link.symlink_to(real)
    files, problems = LicenseFiles.load(link, keyring)
    assert problems == []
    assert [file.path for file in files] == [link / "vector.skm"]


def test_special_files_do_not_hang_or_raise(tmp_path: Path, keyring: KeyRing) -> None:
    os.mkfifo(tmp_path / "pipe.skm")
    (tmp_path / "folder.skm").mkdir()
    (tmp_path / "empty.skm").write_bytes(b"")
    (tmp_path / "bom.skm").write_bytes(b"\xef\xbb\xbf" + VECTOR_SKM.read_bytes())
    files, problems = LicenseFiles.load(tmp_path, keyring)
    assert [file.path.name for file in files] == ["bom.skm"]
    reported = _problems(problems)
    assert set(reported) == {"pipe.skm", "folder.skm", "empty.skm"}
    assert "not a regular file" in reported["pipe.skm"]
    assert "not a regular file" in reported["folder.skm"]
    assert "not JSON" in reported["empty.skm"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_reported(tmp_path: Path, keyring: KeyRing) -> None:
    locked = tmp_path / "locked.skm"
    shutil.copy(VECTOR_SKM, locked)
    locked.chmod(0)
    files, problems = LicenseFiles.load(tmp_path, keyring)
    assert len(files) == 0
    assert [(p.path.name, "cannot be opened" in p.reason) for p in problems] == [("locked.skm", True)]


def test_signed_license_without_product_or_key(tmp_path: Path, own_private: rsa.RSAPrivateKey) -> None:
    keyring = KeyRing([PublicKey.from_rsa(own_private.public_key())])
    no_product = json.dumps({"Key": OWN_KEY, "ActivatedMachines": []}).encode()
    no_key = json.dumps({"ProductId": 1, "Key": "  ", "ActivatedMachines": []}).encode()
    (tmp_path / "no-product.skm").write_text(signed_file(own_private, no_product))
    (tmp_path / "no-key.skm").write_text(signed_file(own_private, no_key))
    files, problems = LicenseFiles.load(tmp_path, keyring)
    assert len(files) == 0
    reported = _problems(problems)
    assert "no ProductId" in reported["no-product.skm"]
    assert "no Key" in reported["no-key.skm"]


def test_constructed_directly() -> None:
    assert len(LicenseFiles()) == 0
    assert LicenseFiles().for_getkey(1, "x") is None

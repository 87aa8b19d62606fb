"""Request parsing: the form parser agrees with the standard library's strict parser on every input."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from license_server.licensing.protocol import (
    FIELD_LIMITS,
    MAX_FIELDS,
    Call,
    RequestError,
    TokenFingerprints,
    form_pairs,
    normalise_path,
    parse_fields,
)

FORM_TEXT = st.text(alphabet=st.sampled_from("ab=&%+2c0FZé\u00ff \x00;"), max_size=40)


def reference(source: str) -> list[tuple[str, str]] | None:
    """What parse_qsl makes of a form in strict mode, or None where it refuses it."""
    try:
        return parse_qsl(
            source, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=MAX_FIELDS
        )
    except ValueError:
        return None


def ours(source: str) -> list[tuple[str, str]] | None:
    """What the daemon's parser makes of it, or None where it refuses it."""
    try:
        return form_pairs(source)
    except ValueError:
        return None


class TestFormParser:
    """The fast form parser is the standard one, faster."""

    @given(FORM_TEXT)
    def test_same_as_parse_qsl(self, source: str) -> None:
        """Every form gives the same pairs, or is refused by both."""
        if source:
            assert ours(source) == reference(source)

    def test_too_many_fields(self) -> None:
        """More than MAX_FIELDS fields are refused, as parse_qsl refuses them."""
        source = "&".join(f"f{i}=1" for i in range(MAX_FIELDS + 1))
        assert ours(source) is None
        assert reference(source) is None


class TestPaths:
    """Every SDK's spelling of an API path comes out the same; anything else is not an API path."""

    @given(st.text(max_size=30))
    def test_never_raises(self, path: str) -> None:
        """Any text gives a normalised method or None, never an exception."""
        result = normalise_path(path)
        assert result is None or result.count("/") == 1

    def test_spellings(self) -> None:
        """Double slashes, trailing slashes and case do not matter."""
        for path in (
            "/api/key/activate",
            "/api//key/activate/",
            "/API/Key/Activate",
            "//api/key//activate//",
        ):
            assert normalise_path(path) == "key/activate"


class TestCacheKeys:
    """Cache keys name kept answers on disk: they stay the same from one version of the daemon to the next."""

    FORM = (
        "token=WyJ0b2tlbiJd&ProductId=3349&Key=AAAAA-BBBBB-CCCCC-DDDDD&MachineCode=abc&Sign=True"
        "&SignMethod=1&FriendlyName=Lab%201&FloatingTimeInterval=0"
    )

    def test_stable_across_versions(self) -> None:
        """A pinned digest: changing how keys are made would orphan every answer kept before an upgrade."""
        call = Call.from_fields("key/activate", parse_fields(self.FORM))
        expected = "e952287666cd2b8df0ca5482e0ab4951e650744fad6099c229a151516b8de91b"
        assert call.cache_key(TokenFingerprints(bytes(range(32)))).hex() == expected

    @pytest.mark.parametrize("field", ["MachineCode", "ProductId", "Key"])
    @pytest.mark.parametrize("spelling", ["{}\t", "{} ", " {}", "{}\n", "{}\u00a0"])
    def test_surrounding_whitespace_is_another_key(self, field: str, spelling: str) -> None:
        """`m1` and `m1<TAB>` are two machines (two products, two keys): they never share a kept answer."""
        fingerprints = TokenFingerprints(bytes(range(32)))
        fields = parse_fields(self.FORM)
        plain = Call.from_fields("key/activate", fields).cache_key(fingerprints)
        name = field.lower()
        spelt = {**fields, name: spelling.format(fields[name])}
        assert Call.from_fields("key/activate", spelt).cache_key(fingerprints) != plain

    def test_fingerprints_bounded(self) -> None:
        """A flood of made-up tokens does not grow the remembered fingerprints past their bound."""
        fingerprints = TokenFingerprints(b"s" * 32, remember=8)
        first = fingerprints("token-0")
        for n in range(100):
            fingerprints(f"token-{n}")
        assert len(fingerprints._known) <= 8
        assert fingerprints("token-0") == first


class TestFieldLimits:
    """Values the daemon keeps (ledger, kept answers, audit) are bounded, far above what the SDKs send."""

    @pytest.mark.parametrize(("name", "label", "limit"), FIELD_LIMITS)
    def test_longest_accepted(self, name: str, label: str, limit: int) -> None:
        """A value exactly as long as the limit is a call like any other."""
        call = Call.from_fields("key/activate", {"token": "t", name: "7" * limit})
        assert call.fields[name] == "7" * limit

    @pytest.mark.parametrize(("name", "label", "limit"), FIELD_LIMITS)
    def test_longer_refused(self, name: str, label: str, limit: int) -> None:
        """One character more is a 400 naming the field and the limit."""
        with pytest.raises(RequestError) as refused:
            Call.from_fields("key/activate", {"token": "t", name: "7" * (limit + 1)})
        assert refused.value.status == 400
        assert f"'{label}'" in refused.value.message
        assert f"at most {limit}" in refused.value.message

    def test_what_sdks_send_fits(self) -> None:
        """A 64-character SHA-256 machine code, a key, a product id and a Windows machine name pass."""
        machine = "9f2c1e" * 10 + "abcd"
        form = f"ProductId=3349&Key=MUYVD-LSEBY-CXHRQ-XFAGY&MachineCode={machine}&FriendlyName=LAB-PC-0042"
        call = Call.from_fields("key/activate", parse_fields(form))
        assert call.machine_code == machine

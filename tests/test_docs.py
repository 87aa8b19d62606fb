"""README, changelog and docs/ stay whole: every relative link and anchor resolves, every key documented."""

import re
from pathlib import Path

import pytest
import yaml

from license_server.config import Config
from tests.test_config import EXAMPLE_FILE, field_paths

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]
CONFIGURATION = ROOT / "docs" / "configuration.md"

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
_ANCHOR = re.compile(r"<a id=\"([^\"]+)\"></a>")
_ROW = re.compile(r"^\| (`[^|]+`) \| ([^|]+) \|", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where a `](...)` is not a link."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a link may name in a page: its headings (numbered when repeated) and explicit ids."""
    text = page.read_text(encoding="utf-8")
    found = set(_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    """The relative link targets of a page."""
    targets = _LINK.findall(prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


class TestLinks:
    """Moving text between pages never leaves a link pointing nowhere."""

    def test_the_docs_are_there(self) -> None:
        """The README links every page of docs/."""
        readme = set(links(ROOT / "README.md"))
        assert DOCS
        for page in DOCS:
            assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"

    @pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
    def test_every_relative_link_resolves(self, page: Path) -> None:
        """Each relative link names a file or folder that exists, and an anchor that page has."""
        for target in links(page):
            path_text, _, anchor = target.partition("#")
            path = (page.parent / path_text).resolve() if path_text else page
            assert path.exists(), f"{page.name}: {target} names no file"
            if anchor:
                assert path.suffix == ".md", f"{page.name}: {target} has an anchor into a non-page"
                assert anchor in anchors(path), f"{page.name}: {target} names no anchor of {path.name}"


class TestConfigurationReference:
    """docs/configuration.md cannot drift from config.example.yaml, which cannot drift from the code."""

    def documented(self) -> dict[str, str]:
        """Each key of the reference's tables, with its default cell."""
        rows: dict[str, str] = {}
        for keys, default in _ROW.findall(CONFIGURATION.read_text(encoding="utf-8")):
            for key in re.findall(r"`([^`]+)`", keys):
                assert key not in rows, f"{key} is documented twice"
                rows[key] = default.strip()
        return rows

    def test_every_setting_is_documented_once(self) -> None:
        """The tables list exactly the settings the code has, and `public_key`, which feeds `public_keys`."""
        settings = {".".join(path) for path in field_paths(Config)} | {"public_key"}
        assert set(self.documented()) == settings

    def test_documented_defaults_are_the_example_values(self) -> None:
        """A default the reference gives as a value is the value config.example.yaml sets."""
        example = yaml.compose(EXAMPLE_FILE.read_text(encoding="utf-8"))
        assert isinstance(example, yaml.MappingNode)
        checked = 0
        for key, default in self.documented().items():
            node: yaml.Node | None = example
            for part in key.split("."):
                assert isinstance(node, yaml.MappingNode)
                node = next((value for name, value in node.value if name.value == part), None)
            if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null":
                assert default == f"`{node.value}`", f"{key}: documented {default}, example {node.value}"
                checked += 1
            elif isinstance(node, yaml.SequenceNode) and not node.value:
                assert default.startswith("`[]`"), f"{key}: documented {default}, example []"
                checked += 1
        assert checked > 30

"""Text a workstation or a visitor chooses: the console shows it as text, never runs it as a template."""

from __future__ import annotations

import html
from collections.abc import Callable

import aiohttp
import pytest

from tests.admin_support import Admin
from tests.conftest import PRODUCT, Upstream, Workstation

# Template syntax of Jinja2 and of string.Template, HTML, quotes and an entity; the console's forms refuse
# unprintable characters, so the bidirectional override comes only from a workstation.
TYPED_NAME = "{{ 7*7 }}{% if true %}IF{% endif %}{# c #}${x}<script>alert('x')</script>\"&amp;"
HOSTILE_NAME = TYPED_NAME + "\u202eRTL"
HOSTILE_KEY = "{{7*7}}<B>{%RAW%}'\"&"
HOSTILE_MACHINE = "ws-{{ config }}-<i>"


def shown(text: str) -> str:
    """Text as a page writes it: escaped, quotes too, and nothing else changed."""
    return html.escape(text, quote=True)


async def get(session: aiohttp.ClientSession, path: str, **params: str) -> tuple[int, str]:
    """A page's status and HTML."""
    async with session.get(path, params=params) as r:
        return r.status, await r.text()


@pytest.fixture
async def hostile(admin: Admin, upstream: Upstream, workstation: Callable[..., Workstation]) -> Admin:
    """A console whose ledger and trail hold a machine that chose a hostile key, machine code and name."""
    upstream.fake.add_license(PRODUCT, HOSTILE_KEY, max_machines=2)
    license_key, message = await workstation(HOSTILE_MACHINE).activate(
        HOSTILE_KEY, friendly_name=HOSTILE_NAME
    )
    assert license_key is not None, message
    await admin.settle()
    return admin


class TestTemplateSyntaxIsText:
    """Jinja2 or string.Template syntax in chosen text is neither evaluated nor dropped, and HTML is inert."""

    async def test_machines_page(self, hostile: Admin) -> None:
        """The machines list shows name, key and machine code as they were sent, and echoes the search."""
        async with hostile.browser() as session:
            await hostile.login(session)
            status, page = await get(session, "/machines", q="{{")
        assert status == 200
        assert f"<td>{shown(HOSTILE_NAME)}</td>" in page
        assert f"<code>{shown(HOSTILE_KEY.upper())}</code>" in page  # the ledger keeps keys upper-case
        assert f'<code title="{shown(HOSTILE_MACHINE)}">{shown(HOSTILE_MACHINE)}</code>' in page
        assert 'name="q" value="{{"' in page
        assert "<script>" not in page
        assert "<B>" not in page
        assert "<i>" not in page

    async def test_audit_page(self, hostile: Admin) -> None:
        """The trail's records and the search fields come back as text."""
        async with hostile.browser() as session:
            await hostile.login(session)
            status, page = await get(session, "/audit", name="{% if true %}", client="<i>{{")
            assert status == 200
            assert f'name="client" value="{shown("<i>{{")}"' in page
            status, page = await get(session, "/audit", name="{% if true %}")
        assert status == 200
        assert f"<td>{shown(HOSTILE_NAME)}</td>" in page
        assert f'<code title="{shown(HOSTILE_MACHINE)}">{shown(HOSTILE_MACHINE)}</code>' in page
        assert f'name="name" value="{shown("{% if true %}")}"' in page
        assert "<script>" not in page

    async def test_forms_echo_what_they_were_given(self, hostile: Admin) -> None:
        """The confirmation and the activation form carry chosen text in their fields unchanged."""
        target = {"product_id": str(PRODUCT), "key": HOSTILE_KEY, "machine_code": HOSTILE_MACHINE}
        async with hostile.browser() as session:
            await hostile.login(session)
            status, confirm = await get(session, "/machines/deactivate", **target, friendly_name=TYPED_NAME)
            assert status == 200
            _, form = await get(session, "/activate", **target, friendly_name=TYPED_NAME)
        assert f"<dd>{shown(TYPED_NAME)}</dd>" in confirm
        assert f'<input type="hidden" name="friendly_name" value="{shown(TYPED_NAME)}">' in confirm
        assert f'name="friendly_name" value="{shown(TYPED_NAME)}"' in form
        assert f'name="key" value="{shown(HOSTILE_KEY)}"' in form
        assert "<script>" not in confirm + form

    async def test_error_and_login_pages(self, admin: Admin) -> None:
        """A refused query's message and the page to return to after login are text too."""
        async with admin.browser() as session:
            status, login = await get(session, "/login", next="/machines?q={{7*7}}<b>")
            assert status == 200
            await admin.login(session)
            status, refused = await get(session, "/audit", since="{{ 7*7 }}<b>")
        assert f'name="next" value="{shown("/machines?q={{7*7}}<b>")}"' in login
        assert status == 400
        assert shown("'{{ 7*7 }}<b>'") in refused
        assert "<b>" not in refused

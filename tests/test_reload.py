"""Reloads: what a re-read configuration may change, built aside and put in force at once."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import pytest

from license_server.config import RESTART_ONLY, Config, hold_restart_only, load_config
from license_server.licensing.signatures import KeyFormatError
from license_server.web.app import prepare_reload
from license_server.web.keys import SERVICES
from license_server.web.listener import ServerTls, tls_context
from tests.conftest import Daemon, Upstream
from tests.pki import Pki
from tests.test_proxy import activate_form, post

# A changed value for each restart-only setting but the TLS pair, as `--set` overrides.
CHANGES = {
    "listen.host": "listen.host=127.0.0.2",
    "listen.port": "listen.port=9999",
    "listen.keepalive_timeout": "listen.keepalive_timeout=5s",
    "state_dir": "state_dir={tmp}/elsewhere",
    "database": "database.url=postgresql://license@db.example.internal/license_server",
    "node": "node.name=license-2",
    "audit": "audit.on_failure=refuse",
    "admin": "admin.idle_days=7",
    "keep.memory_entries": "keep.memory_entries=5",
    "log.format": "log.format=json",
    "shutdown_timeout": "shutdown_timeout=5s",
}
TLS = ("listen.tls_cert", "listen.tls_key")


def config(tmp_path: Path, *overrides: str) -> Config:
    """A configuration through the real loader, with a state folder under tmp_path."""
    return load_config(None, env={}, overrides=[f"state_dir={tmp_path}/state", *overrides])


def certificate(folder: Path) -> tuple[str, str]:
    """A server certificate and key written to `folder`; the two `--set` overrides naming them."""
    folder.mkdir()
    Pki.create(folder).server_context("server")
    return f"listen.tls_cert={folder / 'server.pem'}", f"listen.tls_key={folder / 'server.key'}"


class TestRestartOnly:
    """The settings a reload leaves as they are, listed once in config.RESTART_ONLY."""

    def test_every_one_held_and_named(self, tmp_path: Path) -> None:
        """Each changed restart-only setting is named and stays as in force; the rest of the file applies."""
        assert set(CHANGES) | set(TLS) == set(RESTART_ONLY), "a RESTART_ONLY setting has no case here"
        in_force = config(tmp_path)
        for name, override in CHANGES.items():
            new = config(tmp_path, override.format(tmp=tmp_path), "log.level=debug")
            held, changed = hold_restart_only(in_force, new)
            assert changed == [name]
            assert held == dataclasses.replace(in_force, log=dataclasses.replace(in_force.log, level="debug"))

    def test_unchanged_file(self, tmp_path: Path) -> None:
        """Reading the same file again names nothing and changes nothing."""
        in_force = config(tmp_path)
        assert hold_restart_only(in_force, config(tmp_path)) == (in_force, [])

    def test_tls_switched_on_or_off(self, tmp_path: Path) -> None:
        """Turning TLS on or off needs a restart; the listener keeps what it started with."""
        with_tls = config(tmp_path, *certificate(tmp_path / "one"))
        without = config(tmp_path)
        held, changed = hold_restart_only(with_tls, without)
        assert (changed, held.listen) == (list(TLS), with_tls.listen)
        held, changed = hold_restart_only(without, with_tls)
        assert (changed, held.listen) == (list(TLS), without.listen)

    def test_renewed_certificate_applies(self, tmp_path: Path) -> None:
        """A certificate at another path is no restart: the new paths are in force."""
        before = config(tmp_path, *certificate(tmp_path / "one"))
        after = config(tmp_path, *certificate(tmp_path / "two"))
        assert hold_restart_only(before, after) == (after, [])


class TestPrepareAndSwap:
    """prepare_reload builds aside and changes nothing; Services.swap puts it all in force at once."""

    async def test_nothing_changes_until_swapped(self, daemon: Daemon, upstream: Upstream) -> None:
        """A method taken off the allowlist is allowed until the swap, refused after it."""
        services = daemon.app[SERVICES]
        before = services.config
        narrower = dataclasses.replace(before.upstream, allowed_methods=("key/getkey",))
        reloaded = await prepare_reload(services, dataclasses.replace(before, upstream=narrower))
        assert services.config is before
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        services.swap(reloaded.config, reloaded.rules)
        assert services.config is reloaded.config
        assert services.licensing.rules is reloaded.rules
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 403

    async def test_restart_only_settings_stay(self, daemon: Daemon, tmp_path: Path) -> None:
        """A new state folder is named as needing a restart and is not what the daemon uses."""
        services = daemon.app[SERVICES]
        before = services.config
        moved = dataclasses.replace(before, state_dir=tmp_path / "elsewhere")
        reloaded = await prepare_reload(services, moved)
        assert reloaded.restart_needed == ["state_dir"]
        assert reloaded.config == before

    async def test_egress_replaced_only_when_its_settings_change(
        self, daemon: Daemon, upstream: Upstream
    ) -> None:
        """Same upstream settings: the same egress; new ones: a new egress, the old one closed once idle."""
        services = daemon.app[SERVICES]
        first = services.upstream
        assert first is not None
        same = await prepare_reload(services, services.config)
        assert same.rules.upstream is first
        services.swap(same.config, same.rules)
        assert services.retired == []
        slower = dataclasses.replace(services.config.upstream, timeout=0.5)
        reloaded = await prepare_reload(services, dataclasses.replace(services.config, upstream=slower))
        assert reloaded.rules.upstream is not first
        services.swap(reloaded.config, reloaded.rules)
        assert services.upstream is reloaded.rules.upstream
        await asyncio.sleep(0)  # the retiring task starts
        assert services.retired == [first]
        assert (await post(daemon, "/api/key/activate", activate_form()))[0] == 200
        for _ in range(40):  # closed after its own timeout (1 s) and one second more
            if not services.retired:
                break
            await asyncio.sleep(0.1)
        assert services.retired == []
        assert first.session.closed

    async def test_keys_and_files_in_force_together(self, daemon: Daemon) -> None:
        """The answer cache checks kept answers with the key ring the swap put in force."""
        services = daemon.app[SERVICES]
        reloaded = await prepare_reload(services, services.config)
        services.swap(reloaded.config, reloaded.rules)
        assert services.licensing.keyring is reloaded.rules.keyring
        assert services.licensing.cache.keyring is reloaded.rules.keyring
        assert services.licensing.files is reloaded.rules.files

    async def test_bad_key_refused_before_anything_changes(self, daemon: Daemon) -> None:
        """A vendor key that does not load raises from prepare_reload; the rules in force stay."""
        services = daemon.app[SERVICES]
        rules, before = services.licensing.rules, services.config
        broken = dataclasses.replace(before, public_keys=("<RSAKeyValue><Modulus>x</Modulus></RSAKeyValue>",))
        with pytest.raises(KeyFormatError):
            await prepare_reload(services, broken)
        assert services.licensing.rules is rules
        assert services.config is before


class TestServerTls:
    """A renewed certificate is served to new connections without restarting the listener."""

    async def test_new_handshakes_get_the_context_in_use(self, tmp_path: Path) -> None:
        """After use(), a client trusting only the new CA connects; one trusting only the old does not."""
        for name in ("old", "new"):
            await asyncio.to_thread(certificate, tmp_path / name)
        old, new = [
            await asyncio.to_thread(
                tls_context, tmp_path / name / "server.pem", tmp_path / name / "server.key"
            )
            for name in ("old", "new")
        ]
        tls = ServerTls(old)

        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=tls.context)
        port = server.sockets[0].getsockname()[1]

        async def greeted(ca: Path) -> bool:
            client = ssl.create_default_context(cafile=str(ca))
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            except ssl.SSLCertVerificationError:
                return False
            answer = await reader.read()
            writer.close()
            return answer == b"hello"

        try:
            old_ca, new_ca = tmp_path / "old" / "ca.pem", tmp_path / "new" / "ca.pem"
            assert (await greeted(old_ca), await greeted(new_ca)) == (True, False)
            tls.use(new)
            assert (await greeted(old_ca), await greeted(new_ca)) == (False, True)
        finally:
            server.close()
            await server.wait_closed()

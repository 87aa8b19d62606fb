"""Command line: `license-server serve` and `license-server check-config`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from license_server import __version__, logs
from license_server.app import load_keyring
from license_server.config import Config, ConfigError, describe, load_config
from license_server.license_files import LicenseFiles
from license_server.server import serve
from license_server.signatures import KeyFormatError


def _parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="license-server", description="On-premises Cryptolens license server."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the daemon"),
        ("check-config", "validate a configuration file and the keys and files it names"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--config",
            type=Path,
            default=None,
            help="YAML configuration file (default: $LICENSE_SERVER_CONFIG, else built-in defaults)",
        )
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set listen.port=9000 (repeatable; beats file and environment)",
        )
    return parser


def _load(args: argparse.Namespace) -> Config:
    """Load the configuration the command line names, with environment overrides."""
    path = args.config
    if path is None and (env_path := os.environ.get("LICENSE_SERVER_CONFIG")):
        path = Path(env_path)
    return load_config(path, overrides=args.overrides)


def _check(config: Config) -> list[str]:
    """Problems beyond the file's syntax: vendor keys that do not parse, license files that do not verify."""
    try:
        keyring = load_keyring(config)
    except KeyFormatError as exc:
        return [f"public_key: {exc}"]
    _, problems = LicenseFiles.load(config.license_files, keyring)
    return [f"license_files: {p.path.name}: {p.reason}" for p in problems]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `license-server` command."""
    args = _parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"license-server: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        problems = _check(config)
        for problem in problems:
            print(f"license-server: {problem}", file=sys.stderr)
        if any(p.startswith("public_key") for p in problems):
            return 2
        print(json.dumps(describe(config), indent=2, default=str))
        return 0
    try:
        load_keyring(config)
    except KeyFormatError as exc:
        print(f"license-server: configuration error: public_key: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"license-server: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

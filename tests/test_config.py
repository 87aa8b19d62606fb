"""Tests for license_server.config: precedence, parsing, validation and the example file."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from license_server.cli import main
from license_server.config import (
    DEFAULT_ALLOWED_METHODS,
    MAX_DURATION,
    BreakerConfig,
    Config,
    ConfigError,
    KeepConfig,
    ListenConfig,
    LogConfig,
    UpstreamConfig,
    default_state_dir,
    describe,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)

DATA = Path(__file__).parent / "data"
VENDOR_KEY_FILE = DATA / "cryptolens-example-2019.pubkey.xml"
EXAMPLE_FILE = Path(__file__).parent.parent / "config.example.yaml"
PEM_KEY = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----"


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a config file into `folder` and return its path."""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*overrides: str, path: Path | None = None, env: dict[str, str] | None = None) -> ConfigError:
    """The ConfigError that loading these settings raises."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={} if env is None else env, overrides=overrides)
    return caught.value


class TestDefaults:
    """What a daemon gets with no file, no environment and no overrides."""

    def test_no_file_and_empty_env_gives_the_dataclass_defaults(self) -> None:
        """Every setting takes its dataclass default and the source says so."""
        config = load_config(env={})
        assert config.listen == ListenConfig()
        assert config.upstream == UpstreamConfig()
        assert config.upstream.breaker == BreakerConfig()
        assert config.keep == KeepConfig()
        assert config.log == LogConfig()
        assert config.public_keys == ()
        assert config.license_files is None
        assert config.shutdown_timeout == 10.0
        assert config.source == "built-in defaults"

    def test_documented_default_values(self) -> None:
        """The defaults are the documented ones, not just whatever the dataclasses say."""
        config = load_config(env={})
        assert (config.listen.host, config.listen.port, config.listen.max_body_bytes) == (
            "127.0.0.1",
            8080,
            65536,
        )
        assert config.upstream.url == "https://api.cryptolens.io"
        assert (config.upstream.timeout, config.upstream.connect_timeout) == (5.0, 3.0)
        assert config.upstream.allowed_methods == DEFAULT_ALLOWED_METHODS
        assert config.upstream.proxy is None
        assert config.upstream.ca_file is None
        assert config.upstream.offline is False
        assert config.keep.max_age == 7 * 86400
        assert config.keep.fresh_for == 0.0

    def test_state_dir_defaults_to_first_systemd_state_directory(self) -> None:
        """$STATE_DIRECTORY wins, and only its first colon-separated entry is used."""
        env = {"STATE_DIRECTORY": "/var/lib/license-server:/var/lib/other", "XDG_STATE_HOME": "/xdg"}
        assert load_config(env=env).state_dir == Path("/var/lib/license-server")

    def test_state_dir_defaults_to_xdg_state_home(self) -> None:
        """Without $STATE_DIRECTORY, $XDG_STATE_HOME/license-server is used."""
        assert load_config(env={"XDG_STATE_HOME": "/xdg"}).state_dir == Path("/xdg/license-server")

    def test_state_dir_ignores_relative_xdg_state_home(self) -> None:
        """A relative $XDG_STATE_HOME is invalid per the XDG spec and falls through to the home folder."""
        env = {"XDG_STATE_HOME": "relative", "HOME": "/home/alice"}
        assert default_state_dir(env) == Path("/home/alice/.local/state/license-server")

    def test_state_dir_defaults_to_home(self) -> None:
        """With neither variable, ~/.local/state/license-server is used."""
        assert load_config(env={"HOME": "/home/alice"}).state_dir == Path(
            "/home/alice/.local/state/license-server"
        )
        assert load_config(env={}).state_dir == Path.home() / ".local" / "state" / "license-server"

    def test_config_variable_is_reserved_not_unknown(self) -> None:
        """LICENSE_SERVER_CONFIG is left for the CLI and neither read nor rejected here."""
        config = load_config(env={"LICENSE_SERVER_CONFIG": "/nowhere.yaml"})
        assert config.source == "built-in defaults"

    def test_other_variables_are_ignored(self) -> None:
        """Variables without the LICENSE_SERVER_ prefix are none of this module's business."""
        assert load_config(env={"PATH": "/bin", "LICENSE_SERVERX": "1"}) == load_config(env={})


class TestDataclasses:
    """The settings objects themselves."""

    def test_settings_are_frozen(self) -> None:
        """A loaded config cannot be changed in place."""
        config = load_config(env={})
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.listen.port = 1  # type: ignore[misc]

    def test_settings_are_slotted(self) -> None:
        """Every settings class uses slots."""
        for cls in (Config, ListenConfig, UpstreamConfig, BreakerConfig, KeepConfig, LogConfig):
            assert "__slots__" in vars(cls), cls

    def test_config_can_be_built_in_code(self) -> None:
        """Other modules' tests can build a Config from a state folder alone."""
        config = Config(state_dir=Path("/tmp/state"))  # noqa: S108 -- never touched
        assert config.listen == ListenConfig()
        assert config.public_keys == ()


class TestFile:
    """Settings read from a YAML file."""

    def test_file_values_are_used(self, tmp_path: Path) -> None:
        """Values in the file replace the defaults, units and all."""
        path = write_config(
            tmp_path,
            """
listen: {host: 0.0.0.0, port: 9000, max_body_bytes: 128KiB}
upstream:
  url: https://licensing.example.com/proxy/
  timeout: 1500ms
  connect_timeout: 1
  proxy: http://proxy.example:3128
  offline: yes
  allowed_methods: [Key/Activate, /key/GetKey/]
  max_connections: 4
  max_answer_bytes: 2MiB
  breaker: {failures: 5, reset_after: 1s, max_reset_after: 2m}
state_dir: /var/lib/ls
license_files: /srv/skm
keep: {max_age: 2d, fresh_for: 1h, memory_entries: 0}
log: {level: DEBUG, format: json}
shutdown_timeout: 2.5
""",
        )
        config = load_config(path, env={})
        assert config.listen == ListenConfig(host="0.0.0.0", port=9000, max_body_bytes=128 * 1024)  # noqa: S104
        upstream = config.upstream
        assert upstream.url == "https://licensing.example.com/proxy"
        assert (upstream.timeout, upstream.connect_timeout) == (1.5, 1.0)
        assert upstream.proxy == "http://proxy.example:3128"
        assert upstream.offline is True
        assert upstream.allowed_methods == ("key/activate", "key/getkey")
        assert (upstream.max_connections, upstream.max_answer_bytes) == (4, 2 * 1024 * 1024)
        assert upstream.breaker == BreakerConfig(failures=5, reset_after=1.0, max_reset_after=120.0)
        assert config.state_dir == Path("/var/lib/ls")
        assert config.license_files == Path("/srv/skm")
        assert config.keep == KeepConfig(max_age=2 * 86400, fresh_for=3600, memory_entries=0)
        assert config.log == LogConfig(level="debug", format="json")
        assert config.shutdown_timeout == 2.5
        assert config.source == str(path)

    def test_relative_paths_are_taken_from_the_file_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """state_dir, license_files and ca_file resolve against the config file's folder, not the CWD."""
        folder = tmp_path / "etc"
        folder.mkdir()
        (folder / "ca.pem").write_text("bundle")
        path = write_config(folder, "state_dir: state\nlicense_files: ../skm\nupstream: {ca_file: ca.pem}\n")
        monkeypatch.chdir(tmp_path)
        config = load_config(path.relative_to(tmp_path), env={})
        assert config.state_dir == folder / "state"
        assert config.license_files == folder / ".." / "skm"
        assert config.upstream.ca_file == folder / "ca.pem"

    def test_empty_file_means_defaults(self, tmp_path: Path) -> None:
        """An empty file (or one with only comments) changes nothing."""
        path = write_config(tmp_path, "# nothing yet\n")
        assert dataclasses.replace(load_config(path, env={}), source="built-in defaults") == load_config(
            env={}
        )

    def test_empty_section_means_defaults(self, tmp_path: Path) -> None:
        """A section left empty (all its keys commented out) is an empty mapping."""
        path = write_config(tmp_path, "listen:\n  # port: 9000\nupstream:\n")
        assert load_config(path, env={}).listen == ListenConfig()

    def test_yaml_merge_keys_work(self, tmp_path: Path) -> None:
        """YAML anchors and merge keys are resolved, not taken for unknown keys."""
        path = write_config(tmp_path, "keep: &k {max_age: 1d}\nlisten:\n  <<: {port: 9001}\n  host: ::1\n")
        config = load_config(path, env={})
        assert config.listen.port == 9001
        assert config.listen.host == "::1"

    def test_path_that_is_not_text(self, tmp_path: Path) -> None:
        """A list where a path belongs is an error naming the key."""
        path = write_config(tmp_path, "state_dir: [a]\n")
        assert str(load_error(path=path)) == f"{path}:1: state_dir: expected a path, got ['a']"

    def test_null_clears_optional_settings(self, tmp_path: Path) -> None:
        """null is accepted for settings whose default is none, and for state_dir (its platform default)."""
        path = write_config(
            tmp_path, "upstream: {proxy: null, ca_file: ~}\nlicense_files: null\nstate_dir: null\n"
        )
        config = load_config(path, env={"STATE_DIRECTORY": "/var/lib/x"})
        assert (config.upstream.proxy, config.upstream.ca_file, config.license_files) == (None, None, None)
        assert config.state_dir == Path("/var/lib/x")


class TestPrecedence:
    """Command line over environment over file over defaults."""

    def test_env_over_file(self, tmp_path: Path) -> None:
        """A variable replaces the same key from the file and leaves the file's other keys alone."""
        path = write_config(tmp_path, "listen: {port: 9000, host: 10.0.0.1}\n")
        config = load_config(path, env={"LICENSE_SERVER_LISTEN__PORT": "9100"})
        assert config.listen.port == 9100
        assert config.listen.host == "10.0.0.1"
        assert config.source == f"{path} + environment"

    def test_cli_over_env(self, tmp_path: Path) -> None:
        """An override replaces the same key from the environment and from the file."""
        path = write_config(tmp_path, "upstream: {breaker: {failures: 2}}\n")
        env = {"LICENSE_SERVER_UPSTREAM__BREAKER__FAILURES": "5"}
        config = load_config(path, env=env, overrides=["upstream.breaker.failures=7"])
        assert config.upstream.breaker.failures == 7
        assert config.source == f"{path} + environment + command line"

    def test_env_over_defaults(self) -> None:
        """Without a file the environment still applies, and the source says so."""
        config = load_config(env={"LICENSE_SERVER_SHUTDOWN_TIMEOUT": "30s"})
        assert config.shutdown_timeout == 30.0
        assert config.source == "built-in defaults + environment"

    def test_later_override_wins(self) -> None:
        """Of two overrides of one key, the last counts."""
        config = load_config(env={}, overrides=["listen.port=1", "listen.port=2"])
        assert config.listen.port == 2

    def test_overridden_file_values_are_still_checked(self, tmp_path: Path) -> None:
        """A bad value in the file is an error even if the environment overrides it."""
        path = write_config(tmp_path, "listen: {port: many}\n")
        error = load_error(path=path, env={"LICENSE_SERVER_LISTEN__PORT": "9000"})
        assert error.key == "listen.port"

    def test_env_and_cli_paths_are_relative_to_cwd(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Relative paths from the environment or the command line start from the current folder."""
        monkeypatch.chdir(tmp_path)
        config = load_config(env={"LICENSE_SERVER_STATE_DIR": "state"}, overrides=["license_files=skm"])
        assert config.state_dir == tmp_path / "state"
        assert config.license_files == tmp_path / "skm"


class TestTextValues:
    """How environment and command-line values are read."""

    def test_env_values_are_yaml(self) -> None:
        """Numbers, booleans and lists in variables are parsed as YAML."""
        env = {
            "LICENSE_SERVER_UPSTREAM__ALLOWED_METHODS": "[key/activate, key/GetKey]",
            "LICENSE_SERVER_UPSTREAM__MAX_CONNECTIONS": "8",
            "LICENSE_SERVER_UPSTREAM__OFFLINE": "yes",
        }
        upstream = load_config(env=env).upstream
        assert upstream.allowed_methods == ("key/activate", "key/getkey")
        assert upstream.max_connections == 8
        assert upstream.offline is True

    @pytest.mark.parametrize(
        ("text", "expected"),
        [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False)],
    )
    def test_env_booleans(self, text: str, expected: bool) -> None:
        """Booleans from the environment take true/false, 1/0 and yes/no."""
        assert load_config(env={"LICENSE_SERVER_UPSTREAM__OFFLINE": text}).upstream.offline is expected

    def test_file_booleans_do_not_take_numbers(self, tmp_path: Path) -> None:
        """In the file a boolean must be a YAML boolean, not 1 or 0."""
        path = write_config(tmp_path, "upstream: {offline: 1}\n")
        assert load_error(path=path).key == "upstream.offline"

    def test_unparsable_yaml_is_plain_text(self) -> None:
        """A value that is not valid YAML is taken as plain text, and judged as such."""
        error = load_error(env={"LICENSE_SERVER_UPSTREAM__TIMEOUT": "@5s"})
        assert "'@5s'" in str(error)
        assert error.key == "upstream.timeout"

    def test_text_settings_are_taken_verbatim(self) -> None:
        """Text settings (hosts, paths, keys) are not folded or trimmed by YAML, so a PEM key survives."""
        config = load_config(env={"LICENSE_SERVER_PUBLIC_KEY": PEM_KEY, "LICENSE_SERVER_LISTEN__HOST": "::"})
        assert config.public_keys == (PEM_KEY,)
        assert config.listen.host == "::"

    def test_empty_text_value_unsets(self) -> None:
        """An empty variable for an optional text setting means unset, not an empty path."""
        config = load_config(
            env={"LICENSE_SERVER_UPSTREAM__PROXY": "", "LICENSE_SERVER_LICENSE_FILES": "null"}
        )
        assert config.upstream.proxy is None
        assert config.license_files is None

    def test_empty_value_for_a_number_is_an_error(self) -> None:
        """An empty variable for a number is not silently the default."""
        assert "got null" in str(load_error(env={"LICENSE_SERVER_LISTEN__PORT": ""}))

    def test_cli_override_values_are_yaml(self) -> None:
        """--set values are parsed like environment values; '=' may appear in the value."""
        config = load_config(
            env={}, overrides=["upstream.allowed_methods=[key/activate]", "log.level = warning"]
        )
        assert config.upstream.allowed_methods == ("key/activate",)
        assert config.log.level == "warning"

    @pytest.mark.parametrize("override", ["listen.port", "=9000", "", "listen.port:9000"])
    def test_cli_override_needs_key_and_equals(self, override: str) -> None:
        """An override without key.path=value form is an error quoting it."""
        error = load_error(override)
        assert "expected key.path=value" in str(error)
        assert repr(override) in str(error)


class TestUnknownKeys:
    """Nothing is ignored silently."""

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """An unknown top-level key names itself, the file and the line."""
        path = write_config(tmp_path, "listen: {port: 1}\nstate_dri: /x\n")
        error = load_error(path=path)
        assert str(error).startswith(f"{path}:2: unknown key 'state_dri'")
        assert "did you mean 'state_dir'?" in str(error)
        assert error.key == "state_dri"

    def test_unknown_nested_key(self, tmp_path: Path) -> None:
        """An unknown nested key names its full path and suggests the near miss."""
        path = write_config(tmp_path, "upstream:\n  tiemout: 5s\n")
        error = load_error(path=path)
        assert str(error) == f"{path}:2: unknown key 'upstream.tiemout'; did you mean 'upstream.timeout'?"

    def test_unknown_deeply_nested_key(self, tmp_path: Path) -> None:
        """Unknown keys are found at every level."""
        path = write_config(tmp_path, "upstream:\n  breaker:\n    failure: 3\n")
        assert "unknown key 'upstream.breaker.failure'" in str(load_error(path=path))

    def test_unknown_key_without_a_near_miss(self, tmp_path: Path) -> None:
        """A key like no other gets no suggestion."""
        path = write_config(tmp_path, "zzz: 1\n")
        assert str(load_error(path=path)) == f"{path}:1: unknown key 'zzz'"

    def test_duplicate_key(self, tmp_path: Path) -> None:
        """A key given twice in one mapping is an error, not last-one-wins."""
        path = write_config(tmp_path, "listen:\n  port: 1\n  port: 2\n")
        assert str(load_error(path=path)) == f"{path}:3: duplicate key 'listen.port'"

    def test_section_that_is_not_a_mapping(self, tmp_path: Path) -> None:
        """A scalar or list where a section belongs is an error naming the section."""
        path = write_config(tmp_path, "upstream:\n  breaker: 3\n")
        error = load_error(path=path)
        assert str(error) == f"{path}:2: upstream.breaker: expected a mapping of settings, got 3"

    def test_top_level_that_is_not_a_mapping(self, tmp_path: Path) -> None:
        """A file holding a list instead of settings is an error naming the file."""
        path = write_config(tmp_path, "- listen\n- upstream\n")
        assert str(load_error(path=path)).startswith(f"{path}:1: expected a mapping of settings")

    def test_non_text_key(self, tmp_path: Path) -> None:
        """A number used as a key is an error, not a silently unknown key."""
        path = write_config(tmp_path, "listen:\n  8080: true\n")
        assert "setting names must be text, got 8080" in str(load_error(path=path))

    def test_unknown_env_variable(self) -> None:
        """An unknown LICENSE_SERVER_ variable is an error naming the variable, with the near miss."""
        error = load_error(env={"LICENSE_SERVER_LISTEN_PORT": "9000"})
        assert "unknown environment variable LICENSE_SERVER_LISTEN_PORT" in str(error)
        assert "did you mean LICENSE_SERVER_LISTEN__PORT?" in str(error)

    def test_env_variable_naming_a_section(self) -> None:
        """A variable that names a whole section is an error that shows how to set its keys."""
        error = load_error(env={"LICENSE_SERVER_UPSTREAM__BREAKER": "{failures: 2}"})
        assert "LICENSE_SERVER_UPSTREAM__BREAKER names the section 'upstream.breaker'" in str(error)
        assert "LICENSE_SERVER_UPSTREAM__BREAKER__FAILURES" in str(error)

    def test_unknown_cli_key(self) -> None:
        """An unknown --set key is an error naming the key path."""
        error = load_error("upstream.tiemout=5s")
        assert str(error) == "--set: unknown key 'upstream.tiemout'; did you mean 'upstream.timeout'?"

    def test_cli_key_naming_a_section(self) -> None:
        """--set on a whole section is an error."""
        assert "'listen' is a section" in str(load_error("listen=1"))


class TestFileErrors:
    """Problems with the file itself."""

    def test_yaml_syntax_error_names_file_and_line(self, tmp_path: Path) -> None:
        """Invalid YAML is reported with the file name and the line YAML points at."""
        path = write_config(tmp_path, "listen:\n  port: 1\n  host: [unclosed\n")
        error = str(load_error(path=path))
        assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML: ", error), error

    def test_yaml_syntax_error_line(self, tmp_path: Path) -> None:
        """The line in the message is the one YAML reports, counted from 1."""
        path = write_config(tmp_path, "listen:\n  port: 1\n bad indent: 2\n")
        assert str(load_error(path=path)).startswith(f"{path}:3: invalid YAML")

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config file that does not exist is an error naming it."""
        path = tmp_path / "absent.yaml"
        assert str(load_error(path=path)) == f"{path}: config file not found"

    def test_file_that_is_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 text is an error naming it."""
        path = tmp_path / "config.yaml"
        path.write_bytes(b"listen: {host: \xff}\n")
        assert str(load_error(path=path)).startswith(f"{path}: not UTF-8 text")

    def test_two_documents(self, tmp_path: Path) -> None:
        """A file with two YAML documents is an error, not the first one silently."""
        path = write_config(tmp_path, "listen: {port: 1}\n---\nlisten: {port: 2}\n")
        assert "invalid YAML" in str(load_error(path=path))

    def test_unsafe_tags_are_refused(self, tmp_path: Path) -> None:
        """Python object tags are not constructed."""
        path = write_config(tmp_path, "listen: {host: !!python/object/apply:os.getcwd []}\n")
        assert str(load_error(path=path)).startswith(f"{path}:1: invalid YAML")

    def test_value_error_names_file_line_and_key(self, tmp_path: Path) -> None:
        """A bad value in the file is reported with file, line and key path."""
        path = write_config(tmp_path, "upstream:\n\n  timeout: fast\n")
        error = load_error(path=path)
        assert str(error) == f"{path}:3: upstream.timeout: expected a duration like 5s or 250ms, got 'fast'"
        assert error.key == "upstream.timeout"


class TestValidation:
    """Each bad value is refused with a message naming its key."""

    @pytest.mark.parametrize(
        ("override", "key", "fragment"),
        [
            ("listen.port=70000", "listen.port", "must be between 0 and 65535, got 70000"),
            ("listen.port=-1", "listen.port", "must be between 0 and 65535"),
            ("listen.port=80.5", "listen.port", "expected a whole number"),
            ("listen.port=true", "listen.port", "expected a whole number, got true"),
            ("listen.host=", "listen.host", "expected a host name or address, got null"),
            ("listen.host=a b", "listen.host", "expected a host name or address"),
            ("listen.max_body_bytes=512", "listen.max_body_bytes", "must be between 1KiB and 1MiB, got 512"),
            ("listen.max_body_bytes=2MiB", "listen.max_body_bytes", "must be between 1KiB and 1MiB"),
            ("listen.max_body_bytes=lots", "listen.max_body_bytes", "expected a size like 64KiB"),
            ("upstream.url=http://api.cryptolens.io", "upstream.url", "must use https://"),
            ("upstream.url=ftp://api.cryptolens.io", "upstream.url", "expected an https:// URL"),
            ("upstream.url=https://user:pw@api.cryptolens.io", "upstream.url", "user name or password"),
            ("upstream.url=https://api.cryptolens.io/?x=1", "upstream.url", "query"),
            ("upstream.url=https://api.cryptolens.io/#top", "upstream.url", "fragment"),
            ("upstream.url=https://", "upstream.url", "expected an https:// URL"),
            ("upstream.url=https://api.cryptolens.io:99999", "upstream.url", "expected an https:// URL"),
            ("upstream.url=api.cryptolens.io", "upstream.url", "expected an https:// URL"),
            ("upstream.timeout=0", "upstream.timeout", "must be more than 0"),
            ("upstream.timeout=-1s", "upstream.timeout", "expected a duration"),
            ("upstream.connect_timeout=-2", "upstream.connect_timeout", "must be more than 0"),
            ("upstream.timeout=fast", "upstream.timeout", "expected a duration like 5s or 250ms, got 'fast'"),
            ("upstream.proxy=http://proxy.example", "upstream.proxy", "expected an egress proxy"),
            ("upstream.proxy=socks5://proxy.example:1080", "upstream.proxy", "expected an egress proxy"),
            ("upstream.proxy=http://proxy.example:3128/path", "upstream.proxy", "expected an egress proxy"),
            ("upstream.proxy=http://u:p@proxy.example:3128", "upstream.proxy", "user name or password"),
            ("upstream.ca_file=/nonexistent/ca.pem", "upstream.ca_file", "no such file"),
            ("upstream.offline=maybe", "upstream.offline", "expected true or false, got 'maybe'"),
            ("upstream.offline=2", "upstream.offline", "expected true or false"),
            ("upstream.allowed_methods=key/activate", "upstream.allowed_methods", "expected a list"),
            ("upstream.allowed_methods=[key]", "upstream.allowed_methods", "item 1: expected an API method"),
            ("upstream.allowed_methods=[key/a, key/b/c]", "upstream.allowed_methods", "item 2"),
            (
                "upstream.allowed_methods=[key/act-ivate]",
                "upstream.allowed_methods",
                "expected an API method",
            ),
            (
                "upstream.allowed_methods=[1]",
                "upstream.allowed_methods",
                "expected an API method like key/activate, got 1",
            ),
            ("upstream.max_connections=0", "upstream.max_connections", "must be at least 1, got 0"),
            ("upstream.max_answer_bytes=0", "upstream.max_answer_bytes", "must be at least 1, got 0"),
            ("upstream.breaker.failures=0", "upstream.breaker.failures", "must be at least 1, got 0"),
            ("upstream.breaker.reset_after=0s", "upstream.breaker.reset_after", "must be more than 0"),
            ("upstream.breaker.max_reset_after=1s", "upstream.breaker.max_reset_after", "at least"),
            ("keep.max_age=-1", "keep.max_age", "must not be negative"),
            ("keep.fresh_for=-1", "keep.fresh_for", "must not be negative"),
            ("keep.max_age=100000d", "keep.max_age", "must be at most 3650d"),
            ("keep.memory_entries=-1", "keep.memory_entries", "must be at least 0, got -1"),
            ("log.level=verbose", "log.level", "expected one of debug, info, warning, error, got 'verbose'"),
            ("log.format=xml", "log.format", "expected one of auto, json, console"),
            ("shutdown_timeout=0", "shutdown_timeout", "must be more than 0"),
            ("state_dir=a\0b", "state_dir", "must not contain a NUL character"),
            ("public_keys=oops", "public_keys", "expected a list"),
        ],
    )
    def test_bad_value_names_its_key(self, override: str, key: str, fragment: str) -> None:
        """The error names the key path and says what was wrong."""
        error = load_error(override)
        assert error.key == key
        assert f"{key}: " in str(error)
        assert fragment in str(error)

    def test_error_is_a_value_error(self) -> None:
        """ConfigError is a ValueError, so callers may catch either."""
        assert isinstance(load_error("listen.port=x"), ValueError)

    def test_env_error_names_the_variable(self) -> None:
        """A bad value from the environment names both the variable and the key path."""
        error = load_error(env={"LICENSE_SERVER_LISTEN__PORT": "70000"})
        assert str(error) == (
            "environment variable LICENSE_SERVER_LISTEN__PORT: "
            "listen.port: must be between 0 and 65535, got 70000"
        )

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8081",
            "http://127.9.9.9",
            "http://[::1]:9000/base",
            "http://localhost:1",
            "HTTPS://X.io",
        ],
    )
    def test_plain_http_is_allowed_to_loopback(self, url: str) -> None:
        """http:// upstreams are accepted for loopback hosts (the tests' fake upstream), as is any https."""
        assert load_config(env={}, overrides=[f"upstream.url={url}"]).upstream.url.lower() == url.lower()

    def test_url_trailing_slash_is_dropped(self) -> None:
        """The URL is stored without a trailing slash, ready for /api/<controller>/<method>."""
        config = load_config(env={}, overrides=["upstream.url=https://example.com/prefix/"])
        assert config.upstream.url == "https://example.com/prefix"

    def test_port_zero_is_allowed(self) -> None:
        """Port 0 (any free port) is accepted for tests."""
        assert load_config(env={}, overrides=["listen.port=0"]).listen.port == 0

    def test_allowed_methods_are_normalised_and_deduplicated(self) -> None:
        """Methods are lower-cased, stripped of slashes and listed once."""
        config = load_config(
            env={}, overrides=["upstream.allowed_methods=[' /Key/Activate/ ', key/activate]"]
        )
        assert config.upstream.allowed_methods == ("key/activate",)

    def test_proxy_with_https_scheme(self) -> None:
        """An https:// egress proxy is accepted and kept without a trailing slash."""
        config = load_config(env={}, overrides=["upstream.proxy=https://proxy.example:8443/"])
        assert config.upstream.proxy == "https://proxy.example:8443"


class TestDurations:
    """Duration text and numbers."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (5, 5.0),
            (2.5, 2.5),
            ("250ms", 0.25),
            ("5s", 5.0),
            ("10m", 600.0),
            ("2h", 7200.0),
            ("7d", 604800.0),
            ("1.5s", 1.5),
            (" 3 s ", 3.0),
            ("0s", 0.0),
        ],
    )
    def test_parse(self, value: object, seconds: float) -> None:
        """Numbers are seconds; text takes ms, s, m, h or d."""
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize(
        "value", ["fast", "5", "5 sec", "1h30m", "-5s", "5S", "", True, None, [1], ".5s"]
    )
    def test_parse_refuses(self, value: object) -> None:
        """Text without a unit, unknown units, combined units and non-numbers are refused."""
        with pytest.raises(ValueError, match="expected a duration like 5s or 250ms"):
            parse_duration(value)

    def test_parse_refuses_nan_and_huge(self) -> None:
        """NaN is not a duration and nothing beyond ten years is accepted."""
        with pytest.raises(ValueError, match="expected a duration"):
            parse_duration(float("nan"))
        with pytest.raises(ValueError, match="at most 3650d"):
            parse_duration(float("inf"))
        with pytest.raises(ValueError, match="at most 3650d"):
            parse_duration(10**400)

    @pytest.mark.parametrize(
        ("seconds", "text"), [(0, "0s"), (0.25, "250ms"), (5, "5s"), (90, "90s"), (600, "10m"), (7200, "2h")]
    )
    def test_format(self, seconds: float, text: str) -> None:
        """format_duration picks the largest unit that holds the value exactly."""
        assert format_duration(seconds) == text

    @given(st.floats(min_value=0, max_value=MAX_DURATION, allow_nan=False, allow_infinity=False))
    def test_format_round_trips(self, seconds: float) -> None:
        """Any duration formatted and parsed again is exactly the same number."""
        assert parse_duration(format_duration(seconds)) == seconds

    @given(st.integers(min_value=0, max_value=3650), st.sampled_from(["ms", "s", "m", "h", "d"]))
    def test_unit_text_round_trips(self, count: int, unit: str) -> None:
        """Whole counts of any unit parse to the right seconds, and format back to the same seconds."""
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        seconds = parse_duration(f"{count}{unit}")
        assert seconds == pytest.approx(count * scale)
        assert parse_duration(format_duration(seconds)) == seconds


class TestSizes:
    """Byte size text and numbers."""

    @pytest.mark.parametrize(
        ("value", "size"),
        [
            (100, 100),
            ("100", 100),
            ("100B", 100),
            ("64KiB", 65536),
            ("1MiB", 1048576),
            ("1GiB", 1 << 30),
            ("512KB", 512000),
            ("2k", 2000),
            ("3M", 3_000_000),
            ("1G", 10**9),
            ("64 kib", 65536),
        ],
    )
    def test_parse(self, value: object, size: int) -> None:
        """Numbers are bytes; k/M/G count in 1000s and Ki/Mi/Gi in 1024s."""
        assert parse_size(value) == size

    @pytest.mark.parametrize("value", ["lots", "1.5MiB", "1TiB", "KiB", "-1KiB", True, 1.5, None])
    def test_parse_refuses(self, value: object) -> None:
        """Fractions, unknown units and non-numbers are refused."""
        with pytest.raises(ValueError, match="expected a size like 64KiB or 1MiB"):
            parse_size(value)

    @given(st.integers(min_value=0, max_value=1 << 40))
    def test_format_round_trips(self, size: int) -> None:
        """Any size formatted and parsed again is the same number of bytes."""
        assert parse_size(format_size(size)) == size


class TestPublicKeys:
    """Vendor keys given inline or as files."""

    def test_inline_xml_and_pem(self, tmp_path: Path) -> None:
        """Text starting with '<' or '-----BEGIN' is key text itself, merged from both keys in order."""
        xml = VENDOR_KEY_FILE.read_text().strip()
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"public_key": f"  {xml}", "public_keys": [PEM_KEY]}))
        assert load_config(path, env={}).public_keys == (xml, PEM_KEY)

    def test_key_file_relative_to_config_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A key file path in the file is read relative to the config file's folder."""
        (tmp_path / "etc" / "keys").mkdir(parents=True)
        shutil.copy(VENDOR_KEY_FILE, tmp_path / "etc" / "keys" / "vendor.xml")
        path = write_config(tmp_path / "etc", "public_key: keys/vendor.xml\n")
        monkeypatch.chdir(tmp_path)
        assert load_config(path, env={}).public_keys == (VENDOR_KEY_FILE.read_text().strip(),)

    def test_key_file_from_env_relative_to_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A key file path from the environment is read relative to the current folder."""
        shutil.copy(VENDOR_KEY_FILE, tmp_path / "vendor.xml")
        monkeypatch.chdir(tmp_path)
        config = load_config(env={"LICENSE_SERVER_PUBLIC_KEYS": "[vendor.xml]"})
        assert config.public_keys == (VENDOR_KEY_FILE.read_text().strip(),)

    def test_same_key_twice_is_kept_once(self, tmp_path: Path) -> None:
        """The same key given inline and as a file counts once."""
        xml = VENDOR_KEY_FILE.read_text().strip()
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"public_key": str(VENDOR_KEY_FILE), "public_keys": [xml]}))
        assert load_config(path, env={}).public_keys == (xml,)

    def test_missing_key_file_names_the_key(self, tmp_path: Path) -> None:
        """A key file that does not exist is an error naming the key, file and line."""
        path = write_config(tmp_path, "public_key: vendor.xml\n")
        error = load_error(path=path)
        assert str(error) == f"{path}:1: public_key: key file {tmp_path / 'vendor.xml'} does not exist"
        assert error.key == "public_key"

    def test_missing_key_file_in_list_names_the_item(self, tmp_path: Path) -> None:
        """A missing file in public_keys names the list and the item."""
        path = write_config(tmp_path, f"public_keys:\n  - {VENDOR_KEY_FILE}\n  - nope.pem\n")
        assert "public_keys: item 2: key file" in str(load_error(path=path))

    def test_key_file_without_a_key(self, tmp_path: Path) -> None:
        """A file that holds neither XML nor PEM is refused before any crypto sees it."""
        (tmp_path / "vendor.xml").write_text("hello\n")
        path = write_config(tmp_path, "public_key: vendor.xml\n")
        error = load_error(path=path)
        assert "holds neither an XML <RSAKeyValue> nor a PEM key" in str(error)

    def test_no_keys_is_allowed(self, tmp_path: Path) -> None:
        """An empty public_keys list is accepted; the daemon then keeps nothing."""
        path = write_config(tmp_path, "public_keys: []\n")
        assert load_config(path, env={}).public_keys == ()


class TestDescribe:
    """The start-up summary."""

    def test_summary_is_json_and_hides_key_texts(self) -> None:
        """describe() is JSON-able, counts the keys and never shows their text."""
        config = load_config(env={"LICENSE_SERVER_PUBLIC_KEY": PEM_KEY})
        summary = describe(config)
        text = json.dumps(summary)
        assert "BEGIN PUBLIC KEY" not in text
        assert summary["public_keys"] == 1
        assert summary["source"] == "built-in defaults + environment"
        assert summary["listen"] == {
            "host": "127.0.0.1",
            "port": 8080,
            "max_body_bytes": 65536,
            "tls_cert": None,
            "tls_key": None,
            "allow": [],
            "max_connections": 4096,
            "header_timeout": 10.0,
            "keepalive_timeout": 30.0,
        }
        assert summary["state_dir"] == str(config.state_dir)


VECTOR_SKM = DATA / "cryptolens-example-2019.skm"


def check_config(folder: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`license-server check-config` on a config file written into `folder`: exit code, stdout, stderr."""
    path = write_config(folder, f"state_dir: state\npublic_key: {VENDOR_KEY_FILE}\n{text}")
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestCheckConfig:
    """`check-config` fails, naming key and file, on license files that are missing or do not verify."""

    def test_a_folder_of_good_license_files_passes(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Files that verify with the vendor key: exit 0 and the resolved settings on standard output."""
        (tmp_path / "skm").mkdir()
        shutil.copy(VECTOR_SKM, tmp_path / "skm" / "vector.skm")
        code, out, err = check_config(tmp_path, "license_files: skm\n", capsys)
        assert (code, err) == (0, "")
        assert json.loads(out)["license_files"] == str(tmp_path / "skm")

    def test_a_missing_license_folder_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """license_files naming no folder: exit 2, and the message names the key and the folder."""
        code, out, err = check_config(tmp_path, "license_files: no-such-folder\n", capsys)
        assert (code, out) == (2, "")
        assert f"license_files: {tmp_path / 'no-such-folder'}: the license file folder does not exist" in err

    def test_a_license_folder_that_is_a_file_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """license_files naming a file: exit 2, naming it."""
        (tmp_path / "skm").write_text("not a folder")
        code, _, err = check_config(tmp_path, "license_files: skm\n", capsys)
        assert code == 2
        assert f"license_files: {tmp_path / 'skm'}: the license file folder is not a directory" in err

    @pytest.mark.parametrize(
        ("content", "reason"),
        [
            (b"\x00 this is not a license file \xff", "not UTF-8"),
            (b'{"licenseKey": "e30=", "signature": "AAAA"}', "does not verify"),
        ],
    )
    def test_a_license_file_that_does_not_verify_is_named(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, reason: str
    ) -> None:
        """One bad file among good ones: exit 2, naming that file and why; the good one is not named."""
        (tmp_path / "skm").mkdir()
        shutil.copy(VECTOR_SKM, tmp_path / "skm" / "vector.skm")
        (tmp_path / "skm" / "bad.skm").write_bytes(content)
        code, out, err = check_config(tmp_path, "license_files: skm\n", capsys)
        assert (code, out) == (2, "")
        (line,) = err.splitlines()
        assert line.startswith(
            f"license-server: configuration error: license_files: {tmp_path / 'skm' / 'bad.skm'}: "
        )
        assert reason in line


def field_paths(cls: type[object], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every settable key path of a settings dataclass, sections walked into."""
    paths: list[tuple[str, ...]] = []
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name == "source":
            continue
        if dataclasses.is_dataclass(item.default):
            paths += field_paths(type(item.default), (*prefix, item.name))
        else:
            paths.append((*prefix, item.name))
    return paths


class TestExampleFile:
    """config.example.yaml cannot drift from the code."""

    def test_example_equals_the_defaults(self) -> None:
        """Loading the example gives exactly the built-in defaults (only the source differs)."""
        example = load_config(EXAMPLE_FILE, env={})
        defaults = load_config(env={})
        assert example.source == str(EXAMPLE_FILE)
        assert dataclasses.replace(example, source=defaults.source) == defaults

    def test_example_sets_every_field(self) -> None:
        """Every field of the settings dataclasses is a key in the example."""
        document = yaml.safe_load(EXAMPLE_FILE.read_text())
        for path in field_paths(Config):
            node = document
            for part in path:
                assert isinstance(node, dict), path
                assert part in node, f"{'.'.join(path)} missing from {EXAMPLE_FILE.name}"
                node = node[part]
        assert re.search(r"^# public_key: ", EXAMPLE_FILE.read_text(), re.MULTILINE)

    def test_example_comments_every_key(self) -> None:
        """Each key line in the example has a comment line right above it."""
        lines = EXAMPLE_FILE.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.match(r"\s*#?\s*[a-z_]+:", line) and not line.lstrip().startswith("# "):
                assert lines[number - 1].lstrip().startswith("#"), f"line {number + 1} has no comment: {line}"

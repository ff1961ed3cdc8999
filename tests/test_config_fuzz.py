"""Property: whatever the command line, the environment and the config file say,
``config.load`` either returns settings or raises :class:`ConfigError` with one
line naming the option (or the config file) -- never another exception, never a
traceback for the operator.

Each example draws a value (or none) for every option from each of the three
sources: random text (NUL bytes, non-ASCII, whitespace, huge), numbers, ``none``,
paths that do not exist or are directories or hold the wrong thing, and a few
valid values so that the checks of options that go together are reached too.
Derandomized and bounded, so CI runs the same examples every time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsfiles import CA
from towerws import config

OPTION_NAMES = [f.name for f in config.OPTIONS]
#: what a ConfigError message starts with: an option, or the config file
NAMED = re.compile(r"^(--(?:config|%s)[ :]|config file )" % "|".join(config.cli_name(n) for n in OPTION_NAMES))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths an operator might name: missing, a directory, empty, binary, wrong content, valid PEM."""
    d = tmp_path_factory.mktemp("config-fuzz")
    ca = CA("fuzz-ca")
    issued = ca.issue("localhost", client=True)
    cert, key = issued.write(d, "client")
    both = d / "both.pem"
    both.write_bytes(issued.cert_pem + issued.key_pem)
    other_key = d / "other.key"
    other_key.write_bytes(ca.issue("other").key_pem)
    (d / "empty").write_bytes(b"")
    (d / "binary").write_bytes(bytes(range(256)) * 4)
    (d / "tokens.json").write_text('{"t": {"id": 7}}')
    (d / "secret").write_text("0123456789abcdef0123")
    (d / "ini").write_text("[towerws]\nlisten = tcp:0\n")
    return {
        "missing": str(d / "does-not-exist"),
        "directory": str(d),
        "empty": str(d / "empty"),
        "binary": str(d / "binary"),
        "cert": cert,
        "key": key,
        "both": str(both),
        "other_key": str(other_key),
        "tokens": str(d / "tokens.json"),
        "secret": str(d / "secret"),
        "ini": str(d / "ini"),
    }


# Text without lone surrogates: the config file is written as UTF-8 (invalid UTF-8 is drawn separately).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SPECIAL = [
    "", " ", "\t\n ", "\x00", "a\x00b", "none", "None", " NONE ", "0", "-1", "1", "3.5", "1e309", "nan", "inf",
    "-0", "9" * 5000, "x" * 100_000, "é✓中\u2028", "true", "false", "yes", "maybe", "\r\n", "[towerws]",
    "tcp:0:interface=127.0.0.1", "tcp:99999", "unix:/nonexistent/dir/sock", "ssl:0", "bogus:1", "tcp:0:bogus=1",
    "amqp://h", "amqps://h", "amqps://u:p@h:99999/", "amqp://:1", "http://x", "https://tower.example/",
    "https://u:p@tower.example", "jobs:status_changed", "job_events:<id>", "job_events:/api/v2/jobs/{id}/",
    "https://a.example,null", "direct", "topic", "json", "text",
]
#: values naming one of the fixture's files (drawn by key, resolved inside the test)
FILE_KEYS = ["missing", "directory", "empty", "binary", "cert", "key", "both", "other_key", "tokens", "secret", "ini"]
values = st.one_of(
    st.sampled_from(SPECIAL),
    text,
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(FILE_KEYS).map(lambda key: ("file", key)),
    st.sampled_from(FILE_KEYS).map(lambda key: ("ssl", key)),
)
# Valid values, so that most examples get past the first option and reach the later
# ones and the checks of options that only make sense together.
VALID: dict[str, list[Any]] = {
    "listen": ["tcp:0:interface=127.0.0.1"],
    "amqp_url": ["none", "amqps://h", "amqp://u:p@h/%2F"],
    "tokens_file": [("file", "tokens")],
    "node_id": ["node-1"],
    "groups": ["jobs:status_changed job_events:<id>", "jobs:summary"],
    "tower_url": ["https://tower.example"],
    "tower_ca_file": [("file", "cert")],
    "object_paths": ["job_events:/api/v2/jobs/{id}/"],
    "allowed_origins": ["https://a.example"],
    "amqp_ca_file": [("file", "cert")],
    "amqp_cert_file": [("file", "both"), ("file", "cert")],
    "amqp_key_file": [("file", "key"), ("file", "other_key")],
    "metrics_listen": ["", "tcp:0"],
    "publish_secret_file": [("file", "secret")],
    "console": ["true", "false"],
    "tower_timeout": ["1", "20"],
    "open_handshake_timeout": ["2", "30"],
}


def option_value(name: str) -> st.SearchStrategy[Any]:
    fld = next(f for f in config.OPTIONS if f.name == name)
    valid = VALID.get(name) or [config.shown_default(fld)]
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), values)  # two in three: valid


sources = st.lists(st.sampled_from(OPTION_NAMES), max_size=8, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: option_value(name) for name in names}))
ini_files = sources.map(lambda v: ("ini", v))  # a [towerws] section with these keys
config_files = st.one_of(
    st.none(), st.none(), ini_files, ini_files, ini_files,  # mostly none or a well-formed file
    st.tuples(st.just("raw"), st.binary(max_size=200)),  # anything at all, invalid UTF-8 included
    st.tuples(st.just("ini-text"), text),  # a section with random text in it
    st.sampled_from(FILE_KEYS).map(lambda key: ("path", key)),  # an existing (or missing) file as the config file
    st.tuples(st.just("bad-path"), st.sampled_from(["", " ", "a\x00b", "/nonexistent/towerws.conf"])),
)


def resolve(value: Any, files: dict[str, str]) -> str:
    if isinstance(value, tuple):
        kind, key = value
        return files[key] if kind == "file" else f"ssl:0:privateKey={files[key]}"
    return value


def write_config(spec: Any, files: dict[str, str], path: Path) -> str | None:
    if spec is None:
        return None
    kind, content = spec
    if kind == "path":
        return files[content]
    if kind == "bad-path":
        return content
    if kind == "raw":
        path.write_bytes(content)
    elif kind == "ini-text":
        path.write_text(f"[towerws]\n{content}\n", encoding="utf-8")
    else:
        lines = [f"{key} = {resolve(value, files)}" for key, value in content.items()]
        path.write_text("[towerws]\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cli=sources, env=sources, file_spec=config_files, config_in_env=st.booleans())
def test_load_raises_only_one_line_config_errors(files: dict[str, str], tmp_path: Path, cli: dict, env: dict,
                                                 file_spec: Any, config_in_env: bool) -> None:
    cli_values = {key: resolve(value, files) for key, value in cli.items()}
    environ = {config.env_name(key): resolve(value, files) for key, value in env.items()}
    config_file = write_config(file_spec, files, tmp_path / "towerws.conf")
    if config_in_env and config_file is not None:
        environ[config.ENV_PREFIX + "CONFIG"] = config_file
        config_file = None
    try:
        config.load(cli_values, environ=environ, config_file=config_file)
    except config.ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1, message
        assert NAMED.match(message), message


@pytest.mark.parametrize("url", ["none", " None "])
@pytest.mark.parametrize("option", ["amqp_ca_file", "amqp_cert_file", "amqp_key_file"])
def test_tls_files_without_a_broker_name_the_option(files: dict[str, str], url: str, option: str) -> None:
    with pytest.raises(config.ConfigError, match=f"^--{config.cli_name(option)}: .*--amqp-url"):
        config.load({"amqp_url": url, option: files["both"]}, environ={})

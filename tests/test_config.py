"""Option precedence, validation and the shipped example config."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from towerws import config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "towerws.conf"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    s = config.load({}, environ={})
    assert s.listen == "tcp:8051"
    assert s.exchange == "towerws"
    (broker,) = s.amqp_url
    assert broker.vhost == "/" and broker.port == 5672 and broker.host == "localhost"
    assert s.queue_type == "classic"  # one broker: a quorum queue would buy nothing
    assert s.tokens_file is None
    assert s.node_id and s.node_id != config.load({}, environ={}).node_id  # random suffix


def test_precedence_cli_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path, "[towerws]\nexchange = from-file\nprefetch = 11\nbind_timeout = 3\n")
    env = {"TOWERWS_EXCHANGE": "from-env", "TOWERWS_PREFETCH": "22"}
    s = config.load({"exchange": "from-cli"}, environ=env, config_file=path)
    assert s.exchange == "from-cli"
    assert s.prefetch == 22
    assert s.bind_timeout == 3.0
    assert s.ping_interval == 30.0


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[towerws]\nexchange = via-env-config\n")
    assert config.load({}, environ={"TOWERWS_CONFIG": path}).exchange == "via-env-config"


@pytest.mark.parametrize("key,value", [
    ("prefetch", "0"), ("prefetch", "x"), ("ping_timeout", "0"), ("ping_interval", "-1"),
    ("ping_interval", "nan"), ("listen", "bogus:1"), ("amqp_url", "amqp://:1"), ("exchange", "a b"),
    ("groups", "jobs"), ("amqp_url", "amqp://h:99999/"),
])
def test_invalid_values_name_the_option(key: str, value: str) -> None:
    with pytest.raises(config.ConfigError, match=f"^--{config.cli_name(key)} "):
        config.load({key: value}, environ={})


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load({"amqp_url": "amqp://u:hunter2@h:notaport/"}, environ={})
    assert "hunter2" not in str(info.value)


def test_shipped_config_lists_every_option_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # its tokens_file path is relative, for `make run`
    text = (ROOT / "etc" / "towerws.conf").read_text()
    for fld in config.OPTIONS:
        assert f"\n{fld.name} =" in text or f"\n# {fld.name} =" in text, fld.name
    s = config.load({}, environ={}, config_file=str(ROOT / "etc" / "towerws.conf"))
    assert s.tokens_file is not None and s.tokens_file.users["dev-token"].id == 1

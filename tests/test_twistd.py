"""``twistd towerws`` as a real process: start-up, a full delivery, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import AMQP_URL, ROOT, VENV_BIN, aio_test, connect, delete_queue, unique

TWISTD = str(VENV_BIN / "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_twistd(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "towerws", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@aio_test
async def test_twistd_process_delivers(exchange: str, tokens_file: str, publisher) -> None:
    port = free_port()
    node = unique("twistd")
    proc = await asyncio.create_subprocess_exec(
        TWISTD, "--nodaemon", "--pidfile=", "towerws",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--exchange", exchange, "--node-id", node,
        "--tokens-file", tokens_file, "--queue-expires", "30",
        env={**os.environ, "TOWERWS_AMQP_URL": AMQP_URL}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        # Ready when it says it consumes its queue (an event, not a sleep).
        lines = []
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "twistd exited early:\n" + "".join(lines)
            lines.append(line)
            if f"consuming towerws.{node}" in line:
                break
        ws = await connect(f"ws://127.0.0.1:{port}/websocket/", "token-alice")
        reply = await ws.subscribe({"jobs": ["status_changed"]})
        assert reply["groups_joined"] == ["jobs-status_changed"]
        await publisher.publish("jobs-status_changed", {"status": "successful", "id": 3})
        assert await ws.recv_json() == {"status": "successful", "id": 3}
        await ws.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        delete_queue(f"towerws.{node}")
    rest = (await asyncio.wait_for(proc.stdout.read(), 5)).decode()
    # twistd would re-raise the SIGTERM it stopped on; a shutdown that ran to its end exits 0.
    assert proc.returncode == 0, "".join(lines) + rest
    assert "Server Shut Down." in rest
    assert "#debug]" not in "".join(lines) + rest


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (["--listen", "nonsense:1"], {}, "--listen"),
        (["--amqp-url", "http://x"], {}, "--amqp-url"),
        (["--prefetch", "-3"], {}, "--prefetch"),
        (["--bogus-option", "1"], {}, "bogus-option"),
        ([], {"TOWERWS_PING_INTERVAL": "soon"}, "TOWERWS_PING_INTERVAL"),
        (["--tokens-file", "/nonexistent/tokens.json"], {}, "/nonexistent/tokens.json"),
        (["--config", "/nonexistent/towerws.conf"], {}, "/nonexistent/towerws.conf"),
    ],
)
def test_bad_options_fail_with_one_line(args: list[str], env: dict, expected: str) -> None:
    result = run_twistd(*args, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "case,expected",
    [
        ("tls-file-without-broker", "--amqp-ca-file: given, but --amqp-url is none"),
        ("cert-file-without-broker-from-file", "--amqp-cert-file: given, but --amqp-url is none"),
        ("ssl-listen-with-a-bad-key", "--listen (command line): invalid endpoint description"),
        ("tokens-file-is-a-directory", "--tokens-file (environment TOWERWS_TOKENS_FILE): cannot read"),
        ("config-is-a-directory", "config file"),
        ("newline-in-a-value", "--listen (environment TOWERWS_LISTEN): "),
    ],
)
def test_bad_combinations_fail_with_one_line(tmp_path: Path, case: str, expected: str) -> None:
    """Combinations of command line, environment and config file that once ended in a traceback."""
    from tlsfiles import CA

    issued = CA("twistd-test").issue("localhost", client=True)
    cert, key = issued.write(tmp_path, "client")
    both = tmp_path / "both.pem"
    both.write_bytes(issued.cert_pem + issued.key_pem)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    conf = tmp_path / "towerws.conf"
    conf.write_text(f"[towerws]\namqp_cert_file = {both}\n")
    args, env = {
        "tls-file-without-broker": (["--amqp-url", "none", "--amqp-ca-file", cert], {}),
        "cert-file-without-broker-from-file": (["--config", str(conf)], {"TOWERWS_AMQP_URL": "none"}),
        "ssl-listen-with-a-bad-key": (["--listen", f"ssl:0:privateKey={empty}"], {}),
        "tokens-file-is-a-directory": ([], {"TOWERWS_TOKENS_FILE": str(tmp_path)}),
        "config-is-a-directory": ([], {"TOWERWS_CONFIG": str(tmp_path)}),
        "newline-in-a-value": ([], {"TOWERWS_LISTEN": "tcp:0\nbogus:1"}),
    }[case]
    result = run_twistd(*args, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"t": "seven"}', "entry 1"),
        ('{"t": {"id": -1}}', "entry 1"),
    ],
)
def test_invalid_tokens_file_fails_with_one_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    result = run_twistd("--tokens-file", str(path))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], result.stderr
    assert "seven" not in result.stderr  # a token file's contents are never echoed


@pytest.mark.parametrize(
    "content,expected",
    [
        ("[towerws]\nlisten = tcp:1\nlisen = 2\n", "unknown option 'lisen'"),
        ("not an ini file", "invalid INI"),
        ("[other]\n", "no [towerws] section"),
        ("[towerws]\nmax_message_size = big\n", "--max-message-size"),
    ],
)
def test_invalid_config_file_fails_with_one_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "towerws.conf"
    path.write_text(content)
    result = run_twistd("--config", str(path))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def help_entries(width: int) -> dict[str, str]:
    """``twistd towerws --help`` at ``width`` columns: option -> its help, the wrapped lines joined again."""
    result = subprocess.run([TWISTD, "towerws", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "COLUMNS": str(width)})
    assert result.returncode == 0, result.stderr
    entries: dict[str, str] = {}
    option = None
    for line in result.stdout.split("\n\n")[0].splitlines()[2:]:  # after the usage line and "Options:"
        name, _, text = line.strip().partition("  ")
        if len(line) - len(line.lstrip()) <= 6:  # an option's first line; the rest are indented to the help column
            option = name.split("--")[1].rstrip("=")
            entries[option] = text.strip()
        elif option is not None:
            # textwrap breaks at spaces and after hyphens: rejoin accordingly
            joiner = "" if entries[option].endswith("-") else " "
            entries[option] += joiner + line.strip()
    return entries


@pytest.mark.parametrize("width", [80, 120])
def test_help_shows_each_option_and_its_default_once_and_whole(width: int) -> None:
    from towerws.config import OPTIONS, cli_name, shown_default

    entries = help_entries(width)
    for fld in OPTIONS:
        text = entries[cli_name(fld.name)]
        assert "(default:" not in text, text
        if fld.metadata.get("flag"):
            assert text == fld.metadata["help"]
            continue
        # Every word whole: the help as written, then the default (or its description) once.
        default = fld.metadata.get("brief") or shown_default(fld)
        assert text == f"{fld.metadata['help']} [default: {default}]", text
        assert text.count("[default:") == 1


def test_version_names_towerws_and_its_pinned_libraries() -> None:
    from importlib import metadata

    from towerws import __version__

    result = subprocess.run([TWISTD, "towerws", "--version"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (result.returncode, result.stderr) == (0, "")
    expected = ", ".join(f"{name} {metadata.version(name)}" for name in ("Twisted", "Autobahn", "txAMQP"))
    assert result.stdout == f"towerws {__version__} ({expected})\n"

"""The deployment files in etc/ as shipped: nginx in front of two nodes, supervisord, systemd."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import AMQP_URL, ROOT, VENV_BIN, aio_test, connect, delete_queue, unique
from nginxhelpers import nginx_binary, running_nginx, shipped_site
from test_twistd import free_port
from towerws.config import Settings

ETC = ROOT / "etc"


def default(name: str) -> float:
    return Settings.__dataclass_fields__[name].default


# -- nginx -------------------------------------------------------------------------------


def test_nginx_read_timeout_is_above_the_ping_interval() -> None:
    text = (ETC / "nginx" / "towerws.conf").read_text()
    (seconds,) = re.findall(r"^\s*proxy_read_timeout (\d+)s;", text, re.M)
    assert int(seconds) > default("ping_interval") + default("ping_timeout")
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:\d+", text, re.M)) == 2  # two nodes upstream


@aio_test
async def test_nginx_as_shipped_proxies_websockets_to_two_nodes(server_factory, publisher, tmp_path: Path) -> None:
    nginx_binary()
    nodes = [await server_factory(), await server_factory()]
    port = free_port()
    async with running_nginx(tmp_path, shipped_site([node.port for node in nodes], port), port):
        url = f"ws://127.0.0.1:{port}/websocket/"
        first = await connect(url, "token-alice", additional_headers={"Cookie": "sessionid=abc"})
        second = await connect(url, "token-bob")
        for ws in (first, second):
            assert (await ws.subscribe({"jobs": ["status_changed"]}))["groups_current"] == ["jobs-status_changed"]
        await publisher.publish("jobs-status_changed", {"through": "nginx"})
        for ws in (first, second):
            assert await ws.recv_json() == {"through": "nginx"}
        # least_conn put one client on each node; towerws saw the proxy's forwarded headers.
        protocols = [next(iter(node.service.factory.connections)) for node in nodes]
        assert all(len(node.service.factory.connections) == 1 for node in nodes)
        assert {p.forwarded_for for p in protocols} == {"127.0.0.1"}
        assert [p.credentials.cookie for p in protocols if p.user.id == 7] == ["sessionid=abc"]
        # Only /websocket is proxied.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        assert b" 404 " in await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        await first.close()
        await second.close()


# -- supervisord ---------------------------------------------------------------------------


def test_supervisor_program_settings() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ETC / "supervisor" / "towerws.conf")
    program = parser["program:towerws"]
    assert shlex.split(program["command"])[1:] == ["--nodaemon", "--pidfile=", "towerws", "--config",
                                                    "/etc/towerws/towerws.conf"]
    assert program["stopsignal"] == "TERM" and program["autorestart"] == "unexpected" and program["exitcodes"] == "0"
    assert int(program["stopwaitsecs"]) > default("drain_timeout") + 5


def supervisorctl(conf: Path, *args: str) -> str:
    result = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(conf), *args],
                            capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.broker
@aio_test
async def test_supervisord_runs_and_stops_towerws_gracefully(exchange: str, tokens_file: str,
                                                             tmp_path: Path) -> None:
    port, node = free_port(), unique("supervised")
    program = (ETC / "supervisor" / "towerws.conf").read_text()
    # Only what differs on a test machine: paths, the user, and options through the environment.
    program = (program.replace("/opt/towerws/venv/bin/twistd", str(VENV_BIN / "twistd"))
               .replace("/etc/towerws/towerws.conf", str(ETC / "towerws.conf"))
               .replace("/var/log/supervisor/", f"{tmp_path}/")
               .replace("user=towerws", "user=root" if os.geteuid() == 0 else "")
               .replace("autostart=true", "autostart=false"))
    env = {"LISTEN": f"tcp:{port}:interface=127.0.0.1", "EXCHANGE": exchange, "NODE_ID": node,
           "AMQP_URL": AMQP_URL, "TOKENS_FILE": tokens_file, "QUEUE_EXPIRES": "60"}
    # supervisord expands %(name)s in its values: a literal % is %%.
    program += f"directory={ROOT}\nenvironment=" + ",".join(
        f'TOWERWS_{k}="{v.replace("%", "%%")}"' for k, v in env.items()) + "\n"
    (tmp_path / "program.conf").write_text(program)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nnodaemon=true\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n"
        f"childlogdir={tmp_path}\n[unix_http_server]\nfile={tmp_path}/s.sock\n"
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[supervisorctl]\nserverurl=unix://{tmp_path}/s.sock\n[include]\nfiles = {tmp_path}/program.conf\n"
    )
    supervisord = await asyncio.create_subprocess_exec(str(VENV_BIN / "supervisord"), "-c", str(conf),
                                                       stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(100):  # supervisord's socket appears when it is up
            if (tmp_path / "s.sock").exists():
                break
            await asyncio.sleep(0.05)
        # `start` returns once the program has stayed up for startsecs.
        assert "started" in await loop.run_in_executor(None, supervisorctl, conf, "start", "towerws")
        ws = await connect(f"ws://127.0.0.1:{port}/websocket/", "token-alice")
        await ws.subscribe({"jobs": ["summary"]})
        stopped = loop.run_in_executor(None, supervisorctl, conf, "stop", "towerws")
        assert (await ws.closed(timeout=20))[0] == 1001
        assert "stopped" in await asyncio.wait_for(stopped, 40)
        log = (tmp_path / "supervisord.log").read_text()
        assert "stopped: towerws (exit status 0)" in log, log
        assert "shutdown complete" in "".join(p.read_text() for p in tmp_path.glob("towerws*.log"))
    finally:
        if supervisord.returncode is None:
            supervisord.terminate()
        await asyncio.wait_for(supervisord.wait(), 40)
        delete_queue(f"towerws.{node}")


# -- systemd ---------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def test_systemd_unit_settings() -> None:
    unit = read_unit(ETC / "systemd" / "towerws.service")
    service = unit["Service"]
    assert shlex.split(service["ExecStart"])[1:] == ["--nodaemon", "--pidfile=", "towerws", "--config",
                                                      "/etc/towerws/towerws.conf"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > default("drain_timeout") + 5
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The very command line the supervisord test runs for real.
    supervisor = configparser.ConfigParser(interpolation=None)
    supervisor.read(ETC / "supervisor" / "towerws.conf")
    assert service["ExecStart"] == supervisor["program:towerws"]["command"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (the unit's settings are checked by test_systemd_unit_settings)")
    # The one thing that differs here: where the virtualenv is (verify checks the binary exists).
    unit = (ETC / "systemd" / "towerws.service").read_text().replace("/opt/towerws/venv/bin/twistd",
                                                                      str(VENV_BIN / "twistd"))
    (tmp_path / "towerws.service").write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "towerws.service")],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values; it warns on stderr instead.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr

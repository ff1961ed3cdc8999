"""nginx in front of in-process towerws nodes, configured with ``etc/nginx/towerws.conf`` as shipped.

Only what differs on a test machine changes: the upstream nodes' ports, the
listen address, the paths nginx writes to; a test may add locations (e.g. a
page served from the same origin as the websocket).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from conftest import ROOT

SHIPPED = ROOT / "etc" / "nginx" / "towerws.conf"
UPSTREAM_SERVER = re.compile(r"^(\s*)server 127\.0\.0\.1:\d+(.*)\n", re.M)


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        pytest.skip("nginx is not installed and could not be installed here (make test runs apt-get install -y nginx)")
    return path


def shipped_site(node_ports: list[int], listen_port: int, extra_locations: str = "") -> str:
    """The shipped site with its upstream pointing at ``node_ports`` (one ``server`` line each)."""
    site = SHIPPED.read_text()
    ports = iter(node_ports)

    def server(m: re.Match[str]) -> str:
        port = next(ports, None)
        return "" if port is None else f"{m.group(1)}server 127.0.0.1:{port}{m.group(2)}\n"

    site = UPSTREAM_SERVER.sub(server, site)
    assert next(ports, None) is None, "the shipped site has fewer upstream servers than nodes"
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    if extra_locations:
        site = site.replace("    location / {", extra_locations + "    location / {", 1)
    return site


@asynccontextmanager
async def running_nginx(directory: Path, site: str, port: int) -> AsyncIterator[None]:
    """Run nginx with ``site`` in ``directory`` until the block ends; entered once it accepts on ``port``."""
    nginx = nginx_binary()
    (directory / "towerws.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"{user}daemon off;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log {directory}/access.log;\n"
        + "".join(f"  {kind}_temp_path {directory}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi"))
        + f"  include {directory}/towerws.conf;\n}}\n"
    )
    config = ["-p", str(directory), "-c", str(directory / "nginx.conf")]
    check = subprocess.run([nginx, "-t", *config], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = await asyncio.create_subprocess_exec(nginx, *config, stderr=asyncio.subprocess.PIPE)
    try:
        # nginx says nothing when it is ready: try to connect, a bounded number of times.
        for _ in range(100):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            except OSError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                break
        else:
            pytest.fail(f"nginx did not accept connections: {(directory / 'error.log').read_text()}")
        yield
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)

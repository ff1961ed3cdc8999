"""The twistd plugin is found after both kinds of install, in a fresh venv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.parametrize("editable", [True, False], ids=["pip-install-e", "pip-install"])
def test_twistd_lists_plugin_in_fresh_venv(tmp_path: Path, editable: bool) -> None:
    src = tmp_path / "src"
    # A copy of the checkout (without its venv) so a plain install cannot see the original tree.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build",
                                                              "test-artifacts", "dropin.cache"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    target = ["-e", str(src)] if editable else [str(src)]
    # Verbose: pip shows the build's own output (setuptools' warnings) only then.
    install = subprocess.run([python, "-m", "pip", "install", "-v", "--disable-pip-version-check", *target],
                             timeout=600, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    assert install.returncode == 0, install.stderr[-3000:]
    warnings = [line for line in (install.stdout + install.stderr).splitlines()
                if re.search(r"warn|deprecat", line, re.IGNORECASE)
                # pip about this machine's index configuration, not about the package
                and not re.search(r"Location '[^']*' is ignored", line)]
    assert warnings == [], "\n".join(warnings)
    # Run from elsewhere, so only the installed package can provide the plugin.
    result = subprocess.run([env_dir / "bin" / "twistd", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "towerws" in result.stdout
    result = subprocess.run([env_dir / "bin" / "twistd", "towerws", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert "--amqp-url" in result.stdout
    # The AMQP spec is package data: it must be importable from the installed package.
    result = subprocess.run([python, "-c", "from towerws.amqp.spec import load_spec; print(len(load_spec().classes))"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and int(result.stdout) >= 6, result.stderr
    # So are the console's page, script and style sheet.
    result = subprocess.run([python, "-c", "from towerws.websocket.console import Console; "
                             "print(sorted(len(f.content) > 100 for f in Console().files.values()))"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[True, True, True]", result.stderr


def make(*args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWERWS_") and k not in ("MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**clean, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_run_installs_what_running_needs_and_make_test_adds_the_test_extras(tmp_path: Path) -> None:
    venv_dir = f"VENV={tmp_path / 'venv'}"  # nothing installed there: make -n lists every step
    installs = [line for line in make("-n", "run", venv_dir).splitlines() if "pip install" in line and " -e " in line]
    assert [line.split(" -e ")[1] for line in installs] == ["'.[emit,client]'"]
    installs = [line for line in make("-n", "test", venv_dir).splitlines() if "pip install" in line and " -e " in line]
    assert [line.split(" -e ")[1] for line in installs] == ["'.[emit,client]'", "'.[emit,client,test]'"]


@pytest.mark.parametrize("env,config_text,brokerless", [
    ({}, None, False),
    ({"TOWERWS_AMQP_URL": "none"}, None, True),
    ({"TOWERWS_AMQP_URL": "NONE"}, None, True),
    ({}, "[towerws]\namqp_url = none\n", True),
    ({"TOWERWS_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"}, "[towerws]\namqp_url = none\n", False),
])
def test_make_run_banner_says_how_to_publish(tmp_path: Path, env: dict, config_text: str | None,
                                             brokerless: bool) -> None:
    args = ["-s", "banner"]
    if config_text is not None:
        (tmp_path / "towerws.conf").write_text(config_text)
        args.append(f"CONFIG={tmp_path / 'towerws.conf'}")
    banner = make(*args, env=env)
    assert "python -m websockets 'ws://localhost:8051/websocket/?token=dev-token'" in banner
    if brokerless:
        # towerws-publish goes to RabbitMQ: a broker-less node is published to over HTTP.
        assert "broker-less" in banner and "http://localhost:8051/console" in banner
        assert 'curl -H "Authorization: Bearer $(cat etc/publish.dev.secret)"' in banner
        assert "http://localhost:8051/api/publish" in banner
        assert "towerws-publish jobs-status_changed" not in banner
    else:
        assert ".venv/bin/towerws-publish jobs-status_changed" in banner
        assert "curl -H" not in banner and "broker-less" not in banner

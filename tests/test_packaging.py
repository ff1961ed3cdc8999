"""The twistd plugin is found after both kinds of install, in a fresh venv."""

from __future__ import annotations

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
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *target],
                   check=True, timeout=600, capture_output=True)
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

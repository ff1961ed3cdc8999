"""The docs tell the truth about the code."""

from __future__ import annotations

from pathlib import Path

from towerws import config

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_option_table_matches_code() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin, end = "<!-- options-table:begin -->\n", "\n<!-- options-table:end -->"
    assert begin in doc and end in doc, "docs/configuration.md lost its options-table markers"
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table == config.options_table(), "regenerate with: .venv/bin/python -m towerws.config"

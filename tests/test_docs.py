"""The docs tell the truth about the code, and a reader can follow every link.

No broker needed: ``pytest --noconftest tests/test_docs.py`` runs these without
``conftest.py``'s RabbitMQ check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from towerws import config, metrics
from towerws.app import TowerService

ROOT = Path(__file__).resolve().parent.parent

#: the docs whose relative links must resolve
LINKED_DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md")]
)
#: directories whose Markdown is not ours (virtualenvs, build output, VCS)
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "test-artifacts", "_trial_temp"}

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


# -- helpers -------------------------------------------------------------------------


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered like GitHub (-1, -2)."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        for pattern in (LINK, IMAGE):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def table_after(text: str, header: str) -> list[str]:
    """The rows of the Markdown table whose header line is ``header`` (separator skipped)."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


# -- the options table ---------------------------------------------------------------


def test_configuration_option_table_matches_code() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin, end = "<!-- options-table:begin -->\n", "\n<!-- options-table:end -->"
    assert begin in doc and end in doc, "docs/configuration.md lost its options-table markers"
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table == config.options_table(), "regenerate with: .venv/bin/python -m towerws.config"


# -- the metrics table ---------------------------------------------------------------


def exposed_metrics() -> dict[str, set[str]]:
    """Every metric family a broker-less node registers, by exposed name -> its label values.

    A real (unstarted) TowerService, so the int-backed totals bound in app.py count too.
    """
    settings = config.load({"amqp_url": "none", "listen": "tcp:0"}, environ={})
    service = TowerService(settings)
    families: dict[str, set[str]] = {}
    for family in service.metrics.registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        values = {
            value
            for sample in family.samples
            for label, value in sample.labels.items()
            if family.type == "counter" and label != "le"
        }
        families[family.name + suffix] = values
    return families


def metrics_rows() -> dict[str, str]:
    """Each metric name of the table in docs/operations.md -> its whole row."""
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = table_after(doc, "| metric | type | meaning |")
    named = {}
    for row in rows:
        first_cell = row.split("|")[1]
        for name in re.findall(r"`([a-z][a-z0-9_]*)", first_cell):
            assert name not in named, f"{name} is listed twice"
            named[name] = row
    return named


def test_metrics_table_lists_exactly_the_registered_metrics() -> None:
    registered = {name for name in exposed_metrics() if name.startswith(("towerws_", "process_"))}
    assert any(name.startswith("towerws_") for name in registered)
    documented = set(metrics_rows())
    assert not registered - documented, f"metrics missing from docs/operations.md: {sorted(registered - documented)}"
    # process_* depend on the platform (/proc): only towerws_* must exist everywhere.
    unknown = {name for name in documented - registered if not name.startswith("process_")}
    assert not unknown, f"docs/operations.md lists metrics the code does not register: {sorted(unknown)}"


@pytest.mark.parametrize(
    ("metric", "outcomes"),
    [
        ("towerws_handshakes_total", metrics.HANDSHAKE_OUTCOMES),
        ("towerws_subscribe_requests_total", metrics.SUBSCRIBE_OUTCOMES),
        ("towerws_auth_requests_total", metrics.AUTH_OUTCOMES),
    ],
)
def test_metrics_table_lists_every_outcome(metric: str, outcomes: tuple[str, ...]) -> None:
    row = metrics_rows()[metric]
    missing = [outcome for outcome in outcomes if f"`{outcome}`" not in row]
    assert not missing, f"{metric}: outcomes missing from docs/operations.md: {missing}"


def test_every_labelled_counter_has_its_values_documented() -> None:
    rows = metrics_rows()
    for name, values in exposed_metrics().items():
        if values and name.startswith("towerws_"):
            missing = sorted(value for value in values if f"`{value}`" not in rows[name])
            assert not missing, f"{name}: label values missing from docs/operations.md: {missing}"


# -- links and paths -----------------------------------------------------------------


def test_slug_matches_github() -> None:
    assert slug("AMQP contract (for publishers)") == "amqp-contract-for-publishers"
    assert slug("Over HTTP: POST /api/publish") == "over-http-post-apipublish"
    assert slug("From the API tier: emit_channel_notification") == "from-the-api-tier-emit_channel_notification"
    assert slug("`/readyz` and [links](x.md)") == "readyz-and-links"


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto:: not checked here
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if not path.exists():
            broken.append(f"{where}: no such file")
        elif anchor:
            if path.suffix != ".md":
                broken.append(f"{where}: anchor into a file that is not Markdown")
            elif anchor not in anchors(path):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def all_docs() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
    )


def test_docs_hold_no_machine_specific_paths() -> None:
    found = []
    for doc in all_docs():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for needle in ("/work/", "/root/"):
                if needle in line:
                    found.append(f"{doc.relative_to(ROOT)}:{number}: {needle}")
    assert not found, "machine-specific paths (use repo-relative ones):\n" + "\n".join(found)


def test_every_doc_is_linked_from_the_readme() -> None:
    readme_targets = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    for doc in [ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]:
        assert str(doc.relative_to(ROOT)) in readme_targets, f"README.md has no link to {doc.relative_to(ROOT)}"

"""The docs stay true to the code: the generated configuration reference is current, it names the
flags the apps really parse, and every relative link in the docs leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coinfer import settings_docs

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])


def test_configuration_reference_is_current():
    assert CONFIGURATION.is_file(), "docs/configuration.md is missing: run make docs"
    assert CONFIGURATION.read_text() == settings_docs.generate(), (
        "docs/configuration.md is out of date with the settings classes: run make docs"
    )


def _parsers():
    from device_agent.cli import build_parser as agent_parser
    from edge_server.cli import build_parser as edge_parser

    return {"edge-server": edge_parser(), "device-agent": agent_parser()}


@pytest.mark.parametrize("command, spec", settings_docs.APPS)
def test_documented_flags_are_the_parsed_ones(command, spec):
    parser = _parsers()[command]
    parsed = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    parsed -= {"--help", "--log-level", "--version"}
    cls = settings_docs.settings_class(spec)
    documented = {flag for flag, _, _, _ in settings_docs.rows(cls)}
    # a boolean's --no-<name> form: the header says so once, not a row each
    assert "`--no-name`" in settings_docs.HEADER
    documented |= {f"--no-{n.replace('_', '-')}" for n, f in cls.flat_fields().items() if f.annotation is bool}
    assert documented == parsed, (
        f"{command}: documented but not parsed {sorted(documented - parsed)}, "
        f"parsed but not documented {sorted(parsed - documented)}"
    )


def test_every_setting_is_described():
    for _, spec in settings_docs.APPS:
        for flag, _, _, text in settings_docs.rows(settings_docs.settings_class(spec)):
            assert text.strip(), f"{spec} {flag} has no description"


def test_defaults_are_formatted():
    assert settings_docs.format_default("max_message_bytes", 16 << 20) == "`16777216` (16 MiB)"
    assert settings_docs.format_default("prefix_reuse", True) == "`true`"
    assert settings_docs.format_default("edge", "") == "`''`"
    assert settings_docs.format_default("tx_joules_per_byte", 1e-6) == "`1e-06`"
    assert settings_docs.format_default("grace_seconds", 10.0) == "`10`"


# -- links ------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
CODE = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images outside code blocks and code spans."""
    return LINK.findall(CODE.sub("", FENCE.sub("", text)))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_link_extraction():
    text = "[a](x.md) ![p](img.png) `[no](code.md)`\n```\n[no](fence.md)\n```\n[b](https://e.org) [c](#top)"
    assert links(text) == ["x.md", "img.png", "https://e.org", "#top"]
    assert anchors("# Top\n## The `uq` codecs: why?\n") == {"top", "the-uq-codecs-why"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert doc.is_file(), f"{doc.relative_to(REPO)} is missing"
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"

"""The documentation a newcomer reads stays short, complete and linked: README.md within 200
lines, every `make` target and every params key documented, every relative link resolving."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]


def make_targets() -> list[str]:
    """The Makefile's verbs (its .PHONY targets)."""
    text = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    return phony.group(1).split()


def params_keys() -> list[str]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return [f"{section}.{key}" for section, values in params.items() for key in values]


def test_the_readme_is_short_enough_to_read_first():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_make_target_is_documented():
    text = "\n".join(page.read_text() for page in PAGES)
    missing = [t for t in make_targets() if not re.search(rf"make {re.escape(t)}\b", text)]
    assert not missing, f"not in README.md or docs/: {', '.join(f'make {t}' for t in missing)}"


def test_every_params_key_is_documented_in_the_params_page():
    text = (REPO / "docs" / "params.md").read_text()
    missing = [key for key in params_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/params.md lacks {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files: {broken}"


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in DOCS if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"

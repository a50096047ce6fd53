"""The documentation a newcomer reads stays short, complete, linked and true: README.md within 200
lines, every `make` target, params key, test module and `MNIST_LSTM_*` variable documented, every
`make` command shown naming real targets and variables, every quoted pytest marker one that runs,
the metrics shown the committed ones, every relative link resolving."""

from __future__ import annotations

import json
import re
import shlex

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


def code_in(text: str) -> list[str]:
    """The code a page shows: its fenced blocks and inline `spans`, line by line."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return [line for block in [*fenced, *inline] for line in block.splitlines()]


def make_commands() -> list[tuple[str, list[str], list[str]]]:
    """Every `make …` a page shows: (page, targets, VARIABLE names given on its command line)."""
    found = []
    for page in PAGES:
        for line in code_in(page.read_text()):
            for match in re.finditer(r"(?:^|[\s;(&|])make\s+(.*)", line):
                rest = match.group(1)
                try:
                    words = shlex.split(rest, comments=True)
                except ValueError:  # an unbalanced quote in prose
                    words = rest.split()
                targets, names = [], []
                for word in words:
                    if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", word):
                        names.append(word.split("=", 1)[0])
                    elif names or not re.fullmatch(r"[a-z][\w-]*", word):
                        break  # make's own words end here: prose or another command follows
                    else:
                        targets.append(word)
                found.append((page.name, targets, names))
    return found


def test_every_make_command_the_docs_show_names_real_targets_and_variables():
    text = (REPO / "Makefile").read_text()
    rules = set(re.findall(r"^([\w.-]+):(?!=)", text, re.MULTILINE)) | set(make_targets())
    wrong = []
    for page, targets, names in make_commands():
        wrong += [f"{page}: make {t} (no such target)" for t in targets if t not in rules]
        wrong += [
            f"{page}: make … {n}= (the Makefile never reads it)"
            for n in names
            if not re.search(rf"\$\({n}\)|^{n}\s*[?:]?=", text, re.MULTILINE)
        ]
    assert make_commands(), "no `make` command found in the docs: the parser is broken"
    assert not wrong, "\n".join(wrong)


def test_every_test_module_has_its_line_in_the_testing_page():
    text = (REPO / "docs" / "testing.md").read_text()
    rows = set(re.findall(r"^\| `tests/(test_\w+\.py)` \|", text, re.MULTILINE))
    modules = {p.name for p in (REPO / "tests").glob("test_*.py")}
    assert not modules - rows, f"docs/testing.md has no row for {sorted(modules - rows)}"
    assert not rows - modules, f"docs/testing.md has rows for missing {sorted(rows - modules)}"


def test_every_pytest_marker_expression_the_docs_quote_is_one_ci_or_make_runs():
    runs = "\n".join(
        (REPO / name).read_text()
        for name in ("Makefile", ".ci/run", ".github/workflows/ci.yml", "tools/arm-check")
        if (REPO / name).exists()
    )
    ran = set(re.findall(r'-m "([^"]+)"', runs))
    quoted = {(p.name, m) for p in PAGES for m in re.findall(r'-m "([^"]+)"', p.read_text())}
    wrong = [f'{page}: -m "{marker}"' for page, marker in sorted(quoted) if marker not in ran]
    assert not wrong, f"markers no CI job or make target runs ({sorted(ran)}): {wrong}"


def environment_table() -> str:
    text = (REPO / "docs" / "params.md").read_text()
    return text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]


def test_every_project_environment_variable_is_in_the_table():
    sources = [
        *(REPO / "src").rglob("*.py"),
        *(REPO / "tools").glob("*"),
        *(REPO / ".ci").glob("*"),
        REPO / "Makefile",
        REPO / "tests" / "conftest.py",
        REPO / "tests" / "netlab.py",
    ]
    read = set()
    for path in sources:
        if path.is_file():
            read |= set(re.findall(r"\bMNIST_LSTM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    table = environment_table()
    assert read, "no MNIST_LSTM_* variable found in the code: the search is broken"
    missing = sorted(name for name in read if f"`{name}`" not in table)
    assert not missing, f"docs/params.md#environment-variables lacks {missing}"


def test_the_readme_shows_the_committed_metrics_as_dvc_prints_them():
    metrics = json.loads((REPO / "reports" / "metrics.json").read_text())
    readme = (REPO / "README.md").read_text()
    header = re.search(r"^Path +(.+)$", readme, re.MULTILINE)
    values = re.search(r"^reports/metrics\.json +(.+)$", readme, re.MULTILINE)
    assert header and values, "README.md no longer shows what `dvc metrics show` prints"
    shown = dict(zip(header.group(1).split(), values.group(1).split(), strict=True))
    assert shown == {key: str(round(value, 5)) for key, value in metrics.items()}

"""The README stays a short manual, and nothing cites a document the repository does not hold.

Links inside docs/ are checked by ``mkdocs build --strict`` (``make docs-build``, run by CI); this covers what
mkdocs does not read: the code, the configs, the tests and the README.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"(?<![\w/.-])((?:docs/|sweeps/)?[\w./-]*[A-Za-z]\w*\.md)\b")
# file names the code writes (outputs, not documents) and the README's own links, which are checked below
WRITTEN = {"comparison.md", "table.md", "t.md", "b.md", "out/table.md", "args.md"}


def _sources() -> list[Path]:
    files = [
        *ROOT.glob("gain_exp/**/*.py"),
        *ROOT.glob("conf/**/*.yaml"),
        *ROOT.glob("sweeps/**/*.yaml"),
        *ROOT.glob("tests/*.py"),
        ROOT / "Makefile",
        ROOT / "pyproject.toml",
    ]
    return [f for f in files if f.name != Path(__file__).name]


def test_the_readme_is_a_manual_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move reference and results to docs/"


def test_every_document_the_code_and_configs_cite_exists():
    missing = []
    for path in _sources():
        for cited in CITED.findall(path.read_text()):
            if cited.rsplit("/", 1)[-1] in WRITTEN or cited.startswith(("outputs/", "tmp")):
                continue
            if not ((ROOT / cited).is_file() or (ROOT / "docs" / cited).is_file()):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)


def test_every_relative_link_in_the_readme_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert links and not broken, f"README links to missing files: {broken}"


def test_the_checker_sees_a_missing_document(tmp_path):
    assert CITED.findall('see METHODS.md, "Protocols"; docs/methods.md') == ["METHODS.md", "docs/methods.md"]
    assert not (ROOT / "METHODS.md").exists() and (ROOT / "docs" / "methods.md").is_file()

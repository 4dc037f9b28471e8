"""The docs cannot drift from the code: every link between the Markdown files resolves (the file
and its #anchor), every code path the docs name exists, and every section the code cites
(`docs/usage.md, "Your own model"`, `docs/algorithm.md 5.6`) is a heading of that file."""
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("models", "data", "pipeline", "run", "observe")
TOP_DIRS = ("localloss_pp", "launch", "configs", "benchmarks", "tests", "docs", "examples")
# docs/usage.md lists the module paths of before 0.2.0 on purpose: that section is left out
MOVED_SECTION = "Module paths that moved in 0.2.0 and 0.4.0"


SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "runs", "data", "node_modules"}


def tracked(*patterns: str) -> list[Path]:
    """The repository's files matching `patterns`: git's, with the new ones not ignored (outside
    a git checkout, e.g. an unpacked source archive: every matching file but build output)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              *patterns], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        found = {f for pattern in patterns for f in ROOT.rglob(pattern)}
        return sorted(f for f in found if f.is_file() and
                      not SKIP_DIRS & set(f.relative_to(ROOT).parts[:-1]) and
                      not any(part.endswith(".egg-info") for part in f.parts))
    return sorted({ROOT / p for p in out if (ROOT / p).is_file()})


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no comments in code blocks
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


@cache
def run_in_heads(path: Path) -> list[str]:
    """The bold leads of paragraphs (`**What to protect.** ...`): sections a citation may name."""
    return re.findall(r"^\*\*([^*]+?)\.\*\*", path.read_text(), flags=re.M)


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in headings(path)}


def markdown_files() -> list[Path]:
    return tracked("*.md")


def links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if not re.match(r"[a-z]+://|mailto:", target):
            yield target


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(md):
    bad = []
    for target in links(md):
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists():
            shown = dest.relative_to(ROOT) if ROOT in dest.parents else dest
            bad.append(f"{target}: no file {shown}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{md.relative_to(ROOT)}: " + "; ".join(bad)


def named_paths(md: Path):
    """Backticked code paths: `pipeline/stage.py`, `benchmarks/worker.py`, `launch/`."""
    text = md.read_text()
    if MOVED_SECTION in text:  # up to the next heading of that section's level
        start = text.index(MOVED_SECTION)
        end = text.find("\n## ", start)
        text = text[:start] + (text[end:] if end >= 0 else "")
    for m in re.finditer(r"`([\w./{},*-]+)`", text):
        token = m.group(1).rstrip(".,")
        first = token.split("/")[0]
        if ("/" in token and first in TOP_DIRS + PACKAGE_DIRS) or \
                re.fullmatch(r"[\w/]+\.py", token):
            yield token


def path_exists(token: str, here: Path) -> bool:
    """`token` names a file or folder: from the repository's root, the package's, or (a bare
    file name, as in a folder's own README) the Markdown file's folder or the tests'."""
    if "{" in token:  # tests/{unit,dist,gpu}
        head, inner = token.split("{", 1)
        inner, tail = inner.split("}", 1)
        return all(path_exists(head + part + tail, here) for part in inner.split(","))
    if "*" in token:
        return any(ROOT.glob(token)) or any((ROOT / "localloss_pp").glob(token))
    if "/" not in token:
        return (here / token).exists() or any(ROOT.glob(f"localloss_pp/**/{token}")) or \
            any(ROOT.glob(f"tests/*/{token}"))
    return (ROOT / token).exists() or (ROOT / "localloss_pp" / token).exists()


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_path_named_in_the_docs_exists(md):
    missing = sorted({t for t in named_paths(md) if not path_exists(t, md.parent)})
    assert not missing, f"{md.relative_to(ROOT)} names paths that do not exist: {missing}"


CITATION = re.compile(r"docs/(\w+\.md)((?:,? \\?\"[^\"\\]+\\?\")*)"
                      r"(?: (?:section |appendix |§)?([0-9]+(?:\.[0-9]+)*|[A-Z])\b)?")


def citations():
    """(source file, cited doc, [quoted section titles], section number or None)."""
    for src in tracked("*.py", "*.sh", "*.toml", "*.sbatch", "*.cfg"):
        for m in CITATION.finditer(src.read_text()):
            titles = re.findall(r"\\?\"([^\"\\]+)\\?\"", m.group(2))
            yield src.relative_to(ROOT), m.group(1), titles, m.group(3)


def test_every_section_the_code_cites_exists():
    bad, seen = [], 0
    for src, doc, titles, number in citations():
        seen += 1
        path = ROOT / "docs" / doc
        if not path.exists():
            bad.append(f"{src}: docs/{doc} does not exist")
            continue
        names = [re.sub(r"[`*]", "", h) for h in headings(path) + run_in_heads(path)]
        for title in titles:
            if not any(h.lower() == title.lower() or h.lower().startswith(title.lower() + " ")
                       or h.lower().startswith(title.lower() + ":") for h in names):
                bad.append(f"{src}: docs/{doc} has no section {title!r}")
        if number and not any(re.match(rf"(?:appendix )?{re.escape(number)}[ .:]", h, re.I)
                              for h in names):
            bad.append(f"{src}: docs/{doc} has no section {number}")
    assert seen > 20  # the scan finds the citations (it would pass vacuously otherwise)
    assert not bad, "\n".join(bad)


def test_the_slug_matches_githubs():
    assert slug("Stage times: what each figure means") == "stage-times-what-each-figure-means"
    assert slug("9. Where this project differs from the reference") == \
        "9-where-this-project-differs-from-the-reference"
    assert slug("`--bio` variants") == "--bio-variants"

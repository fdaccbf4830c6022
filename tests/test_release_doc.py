"""Every `release.md <section>` citation in the code, tests, benchmarks, tools and README names a section
heading of docs/release.md, README links to it use GitHub's anchors, and no bare "spec <section>"
citation of the old, unshipped document is left. Plain text scanning: no JAX."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "release.md"
SCANNED = ["m141jax", "tools", "benchmarks", "tests", "README.md"]
SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt"}

SECTION = r"[A-Z](?:\.\d+)*[a-z]?(?![\w])"  # A, B.6, D.5b, B.2.1
# "release.md C.2, C.3, F", "release.md E.1–E.3", "release.md C.2-C.3", "release.md A.3 step 2, E"
CITATION = re.compile(rf"release\.md\s+({SECTION}(?:(?:\s*[,–-]\s*|\s+step\s+\d+,\s*){SECTION})*)")
BARE = re.compile(r"\bspec\s+[A-K](?:\.\d+[a-z]?)?(?![\w])")
HEADING = re.compile(r"^#{2,4}\s+([A-K](?:\.\d+)*[a-z]?)\.?\s+(.*)$")
LINK = re.compile(r"docs/release\.md#([\w-]+)")


def _files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix in SUFFIXES and p.resolve() != Path(__file__).resolve():
                    yield p


def _slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _headings():
    ids, slugs = set(), set()
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            ids.add(m.group(1))
            slugs.add(_slug(line.lstrip("#")))
    return ids, slugs


def _citations():
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            for m in CITATION.finditer(line):
                for sec in re.findall(SECTION, m.group(1)):
                    yield f"{path.relative_to(ROOT)}:{n}", sec


def test_doc_exists_with_sections():
    ids, _ = _headings()
    assert {"A", "B", "C", "D", "E", "F", "G", "H"} <= ids
    assert {"A.3", "B.6", "C.1", "D.5b", "E.3", "G.2"} <= ids


def test_citations_name_existing_sections():
    ids, _ = _headings()
    cites = list(_citations())
    assert cites, "no release.md citations found"
    missing = [f"{where}: {sec}" for where, sec in cites if sec not in ids]
    assert not missing, "cited sections without a heading in docs/release.md:\n" + "\n".join(missing)


def test_readme_links_use_existing_anchors():
    _, slugs = _headings()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    bad = [a for a in LINK.findall(text) if a not in slugs]
    assert not bad, f"README links to missing anchors of docs/release.md: {bad}"


def test_no_bare_spec_citations():
    hits = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {m.group(0)}" for m in BARE.finditer(line)]
    assert not hits, "citations of the old spec left (cite release.md instead):\n" + "\n".join(hits)

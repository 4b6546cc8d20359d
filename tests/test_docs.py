"""The documents that are generated from nothing but must not drift from the code: the
configuration table against the variables the code reads, the Redis layout against Keyspace, and
the README's size and links."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from speechgate.core.keyspace import Keyspace
from speechgate.core.settings import ENV_NAMES

ROOT = Path(__file__).parent.parent
VARIABLE = re.compile(r"\b((?:SPEECHGATE|SPEECH)_[A-Z0-9_]+|REDIS_URL)\b")


def table_rows(doc: str) -> list[str]:
    """The first cell of each row of the document's tables."""
    return [line.split("|")[1] for line in doc.splitlines() if line.startswith("| `")]


def test_the_configuration_table_lists_exactly_what_the_code_reads() -> None:
    source = "\n".join(path.read_text() for path in (ROOT / "speechgate").rglob("*.py"))
    read = set(re.findall(r'"' + VARIABLE.pattern + r'"', source)) | set(ENV_NAMES.values())
    documented = {
        name
        for cell in table_rows((ROOT / "docs" / "configuration.md").read_text())
        for name in VARIABLE.findall(cell)
    }
    assert documented - read == set(), "documented but never read"
    assert read - documented == set(), "read but not documented"


SAMPLES = {  # a value for each parameter, and how the document writes it
    "client_id": ("CLIENTX", "<client>"),
    "subject": ("SUBJECTX", "<subject>"),
    "jti": ("JTIX", "<jti>"),
    "day": ("20991231", "<YYYYMMDD>"),
    "minute": (987654321, "<epoch minute>"),
    "policy": ("KINDX", "<kind>"),
    "ident": ("WHOX", "<who>"),
    "amount": (111111, "<amount>"),
    "window_s": (222222, "<window>"),
    "rate": ("sg:rl:{CLIENTX}:KINDX:111111/222222:WHOX", "<rate>"),
    "name": ("UPSTREAMX", "<upstream>"),
    "what": ("CALLSX", "<calls>"),
}


def test_the_redis_layout_lists_exactly_the_keys_keyspace_builds() -> None:
    keyspace = Keyspace("sg:")
    built = set()
    for name, member in inspect.getmembers(Keyspace):
        if name.startswith("_") or not (isinstance(member, property) or inspect.isfunction(member)):
            continue
        if isinstance(member, property):
            key = getattr(keyspace, name)
        else:
            method = getattr(keyspace, name)
            key = method(**{p: SAMPLES[p][0] for p in inspect.signature(method).parameters})
        if "*" in key:  # a SCAN pattern over keys listed already
            continue
        for value, written in SAMPLES.values():
            key = key.replace(str(value), written)
        built.add(key)
    doc = (ROOT / "docs" / "redis-layout.md").read_text()
    documented = {re.sub(r"`|\(channel\)", "", cell).strip() for cell in table_rows(doc)}
    assert documented == built


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 8 * 1024
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (ROOT / target).exists(), target
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}"
        assert "DESIGN.md" not in doc.read_text()


REPO_PATH = re.compile(r"(?<![\w/.-])((?:speechgate|tests|docs|deploy|bench|script|\.ci)/[\w./-]*\w)")


def _sources() -> list[Path]:
    found = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    for folder in ("speechgate", "tests", "bench", "deploy"):
        found += [p for p in (ROOT / folder).rglob("*.py") if "node_modules" not in p.parts]
    return found


def test_every_repository_path_the_docs_and_docstrings_name_exists() -> None:
    """Docs and docstrings once cited files the repository lacks (notes kept beside it, outside
    it): a reader following them found nothing. Every path named is in the repository."""
    named = {(p, m) for p in _sources() for m in REPO_PATH.findall(p.read_text(encoding="utf-8"))}
    assert len(named) > 100
    missing = sorted(f"{p.relative_to(ROOT)}: {m}" for p, m in named if not (ROOT / m).exists())
    assert not missing, missing
    outside = sorted(
        str(p.relative_to(ROOT))
        for p in _sources()
        if p.name != "test_docs.py"
        and re.search(r"shared/reference|DESIGN\.md", p.read_text(encoding="utf-8"))
    )
    assert not outside, f"cite what lies outside the repository: {outside}"

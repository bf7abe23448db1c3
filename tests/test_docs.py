"""The README, docs/ and docker-compose.yml against the code: settings and their defaults."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import yaml

from dispatcher.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [README, *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
FIELDS = {PREFIX + f.name.upper(): f.name for f in fields(Settings)}
VARIABLE = re.compile(r"\bDISPATCHER_[A-Z0-9_]*[A-Z0-9]\b")
# Names the docs use for a pattern, not a variable ("any DISPATCHER_X as DISPATCHER_X_FILE").
PLACEHOLDERS = {"DISPATCHER_X", "DISPATCHER_X_FILE"}


def section(title: str) -> str:
    """The README's text from ``## title`` to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def rows(text: str) -> list[list[str]]:
    """The cells of every table row in ``text``."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for line in text.splitlines()
        if line.startswith("| `")
    ]


def real_default(name: str) -> str:
    """The default of setting ``name`` as its variable would spell it."""
    return Settings().to_env()[name]


def same(documented: str, real: str) -> bool:
    """Whether a default written in the docs means the real one."""
    if documented in {"none", "empty", "off"}:
        return real in {"", "{}"}
    if "…" in documented:  # "5,30,…,86400": the ends of a long list
        head, _, tail = documented.partition("…")
        return real.startswith(head) and real.endswith(tail)
    try:
        return float(documented) == float(real)
    except ValueError:
        return documented == real


def test_every_setting_is_in_a_readme_table_by_its_full_name() -> None:
    tabled = {name for row in rows(README) for name in VARIABLE.findall(row[0])}
    assert sorted(set(FIELDS) - tabled) == []


def test_every_variable_the_docs_name_is_a_setting() -> None:
    named = {name for text in DOCS for name in VARIABLE.findall(text)}
    known = set(FIELDS) | {f"{name}_FILE" for name in FIELDS} | PLACEHOLDERS
    # DISPATCHER_RBM_* and the like: a prefix of settings, named with a star.
    stars = {name for text in DOCS for name in re.findall(r"\b(DISPATCHER_[A-Z_]+)\*", text)}
    assert stars and all(any(f.startswith(s) for f in FIELDS) for s in stars)
    assert sorted(named - known) == []


def test_the_configuration_table_gives_the_real_defaults() -> None:
    checked = 0
    for row in rows(section("Configuration")):
        names = VARIABLE.findall(row[0])
        if not names:
            continue  # PROMETHEUS_MULTIPROC_DIR: not a setting of ours
        assert len(names) == len(row[0].split(" / ")), f"write each name in full: {row[0]}"
        defaults = row[1].split(" / ") if len(names) > 1 else [row[1]]
        assert len(defaults) in (1, len(names)), row
        for name, text in zip(names, defaults * len(names), strict=False):
            if name == "DISPATCHER_DATABASE_URL":
                assert "dispatcher.db" in text and "DISPATCHER_VAR_DIR" in text
                continue
            quoted = re.match(r"`([^`]*)`", text)
            word = quoted.group(1) if quoted else text.split(" ")[0]
            assert same(word, real_default(name)), f"{name}: documented {text!r}"
            checked += 1
    assert checked >= 60


def test_vendor_tables_give_the_real_defaults() -> None:
    checked = 0
    for row in rows(README):
        names = VARIABLE.findall(row[0])
        found = re.search(r"default `([^`]*)`", row[-1])
        if len(names) == 1 and found:
            assert same(found.group(1), real_default(names[0])), row
            checked += 1
    assert checked >= 3


# Settings docker-compose.yml decides itself, or that only `dispatcher run` and SQLite read.
NOT_FROM_COMPOSE_SHELL = {
    f"{PREFIX}{name}"
    for name in (
        "API_HOST",
        "API_PORT",
        "FLOWER_PORT",
        "FLOWER_BASIC_AUTH",
        "API_WORKERS",
        "SEND_CONCURRENCY",
        "CALLBACK_CONCURRENCY",
        "VAR_DIR",
        "EMBEDDED_REDIS",
        "SQLITE_WRITE_GATE",
    )
}


def test_compose_passes_every_other_setting_and_only_settings() -> None:
    """A setting in the shell or .env reaches the containers (README, "Production")."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    passed = {
        name
        for block in (compose["x-app-env"], compose["x-worker-env"])
        for name in block
        if name.startswith(PREFIX)
    }
    assert sorted(passed - set(FIELDS)) == []
    assert sorted(set(FIELDS) - passed - NOT_FROM_COMPOSE_SHELL) == []
    assert passed.isdisjoint(NOT_FROM_COMPOSE_SHELL)


def test_every_command_the_docs_name_exists() -> None:
    import click

    from dispatcher.cli import main

    assert isinstance(main, click.Group)
    named = {
        tuple(words.split())
        for text in DOCS
        for words in re.findall(r"\bdispatcher ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", text)
    }
    assert len(named) >= 15
    for words in sorted(named):
        command = main.commands.get(words[0])
        assert command is not None, f"dispatcher {words[0]}"
        if isinstance(command, click.Group) and len(words) > 1:
            assert words[1] in command.commands, f"dispatcher {' '.join(words)}"

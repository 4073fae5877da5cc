"""The project's documentation stays true and self-contained.

- every quoted sentence of docs/billing-models.md is, word for word, on the provider's
  page it cites (the pages are kept outside the repository, in the team's shared
  folder: without them the check is skipped);
- every config key the page says expresses a model is what config.example.yaml has;
- no user-facing file points at a file outside the repository;
- README's map lists every page of docs/, every relative link of README and docs/
  resolves (its file, and its #anchor to a heading), every `docs/PAGE.md` a shipped file
  names exists, every test a page names exists, and every module docs/architecture.md
  names exists.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "billing-models.md"
# The providers' billing pages the team works from (never shipped, never linked to).
PAGES = Path(os.environ.get("MAILMETER_PROVIDER_PAGES", "/work/shared/seeds"))


def _plain(text: str) -> str:
    """Text without markup (markdown bold and escapes, HTML tags), one space between words."""
    text = re.sub(r"<[^>]+>", "", text).replace("\\", "").replace("**", "").replace("\u2019", "'")
    return re.sub(r"\s+", " ", text).strip()


def quotes(markdown: str) -> list[str]:
    """Each quoted paragraph and quoted list item of a markdown text."""
    found: list[str] = []
    paragraph: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        body = line[1:].strip() if line.startswith(">") else None
        if body and not body.startswith("- "):
            paragraph.append(body)
            continue
        if paragraph:
            found.append(" ".join(paragraph))
            paragraph = []
        if body and body.startswith("- "):
            found.append(body[2:])
    return found


def test_every_quote_is_word_for_word_on_a_providers_page() -> None:
    if not PAGES.is_dir():
        pytest.skip(f"the providers' pages are not on this machine ({PAGES}; set MAILMETER_PROVIDER_PAGES)")
    pages = _plain(" ".join(path.read_text(encoding="utf-8") for path in sorted(PAGES.iterdir())))
    found = quotes(DOC.read_text(encoding="utf-8"))
    assert len(found) >= 30
    assert [quote for quote in found if _plain(quote) not in pages] == []


def _subset(part: Any, whole: Any) -> bool:
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _subset(v, whole[k]) for k, v in part.items())
    if part == ["..."]:
        return isinstance(whole, list)
    return bool(part == whole)


def test_the_config_keys_of_each_model_are_the_example_configs() -> None:
    plans = yaml.safe_load((REPO / "config.example.yaml").read_text())["plans"]
    sections = re.findall(r"\*\*Config\*\* \(`([\w-]+)`\):(.*?)\n\n", DOC.read_text(encoding="utf-8"), re.S)
    assert [name for name, _ in sections] == [
        "per-email-threshold",
        "prepaid-tiered",
        "delivery-results",
        "included-capped",
        "limit-overage",
    ]
    for name, text in sections:
        fragments = [f for f in re.findall(r"`([^`]+)`", text.replace("\n", " ")) if re.match(r"\w+: ", f)]
        assert fragments, name
        for fragment in fragments:
            assert _subset(yaml.safe_load("{" + fragment + "}"), plans[name]), (name, fragment)


def _shipped_files() -> list[str]:
    """The repository's files: tracked, and new ones not ignored (a page not committed yet)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(set(listed))


def test_no_user_facing_file_points_outside_the_repository() -> None:
    files = _shipped_files()
    outside = re.compile(r"BILLING_MODELS|seeds/|\.\./shared|/work/shared")
    offenders = [
        name
        for name in files
        if not name.startswith(("tests/", ".ci/"))
        and (REPO / name).is_file()
        and outside.search((REPO / name).read_text(encoding="utf-8", errors="replace"))
    ]
    assert offenders == []


PAGES_READ = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """A markdown page without its fenced code blocks (a `# comment` in a shell block is no heading)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """The #anchors of a markdown page's headings, as GitHub makes them."""
    found: set[str] = set()
    for line in _prose(path).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            candidate, n = slug, 0
            while candidate in found:
                n += 1
                candidate = f"{slug}-{n}"
            found.add(candidate)
    return found


def test_the_readme_maps_every_docs_page() -> None:
    """One row per page in the map (`| [docs/PAGE.md](docs/PAGE.md) | what it is for | who reads it |`)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[docs/([\w.-]+\.md)\]\(docs/\1\) \| [^|]+ \| [^|]+ \|$", readme, re.M)
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", readme))
    pages = {page.name for page in (REPO / "docs").glob("*.md")}
    assert sorted(rows) == sorted(set(rows)) and set(rows) == pages, "README's map: one row for each page of docs/"
    assert linked - pages == set(), "pages README links to that do not exist"
    assert {
        "operating.md",
        "smtp-replies.md",
        "billing-models.md",
        "billing.md",
        "delivery-results.md",
        "guarantees.md",
        "several-nodes.md",
        "http-api.md",
        "architecture.md",
    } <= pages


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES_READ:
        for target in _LINK.findall(_prose(page)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.is_relative_to(REPO) or not path.exists():
                broken.append((page.name, target))
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append((page.name, target))
    assert broken == []


def test_every_docs_page_a_shipped_file_names_exists() -> None:
    named = set()
    for name in _shipped_files():
        if (REPO / name).is_file() and not name.startswith(".git"):
            named |= {
                (name, page)
                for page in re.findall(
                    r"docs/([a-z][a-z0-9-]*\.md)", (REPO / name).read_text(encoding="utf-8", errors="replace")
                )
            }
    assert named, "no file names a docs page"
    assert [(name, page) for name, page in sorted(named) if not (REPO / "docs" / page).is_file()] == []


def test_every_test_the_docs_name_exists() -> None:
    """`test_x.py` and `test_x.py::test_y` (a `*` matches any name) on a page: the file may sit in
    any folder of tests/ (tests move with their modules), the function must be in it; a path
    written in full (`tests/policies/test_x.py`) must be exactly that."""
    cited, paths = set(), set()
    for page in PAGES_READ:
        text = page.read_text(encoding="utf-8")
        cited |= set(re.findall(r"(test_\w+\.py)(?:::(test_[\w*]+))?", text))
        paths |= set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert len(cited) > 50 and paths
    missing = [path for path in sorted(paths) if not (REPO / path).is_file()]  # a path given in full is exact
    for file, function in sorted(cited):
        found = list((REPO / "tests").rglob(file))
        if not found:
            missing.append(file)
            continue
        if function:
            source = "".join(path.read_text(encoding="utf-8") for path in found)
            defined = re.findall(r"^(?:async )?def (test_\w+)", source, re.M)
            if not fnmatch.filter(defined, function):
                missing.append(f"{file}::{function}")
    assert missing == []


_LAYOUT_MERGED = (REPO / "metering" / "sqlite").is_dir()


@pytest.mark.skipif(not _LAYOUT_MERGED, reason="the new layout's modules (metering/sqlite/, ...) are not here yet")
def test_every_module_the_architecture_page_names_exists() -> None:
    """`mailmeter.relay.smtpd` is relay/smtpd.py; `mailmeter.cli` is mailmeter/cli.py."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = set(re.findall(r"\bmailmeter(?:\.\w+)+", text))
    assert len(modules) > 30
    missing = []
    for module in sorted(modules):
        parts = module.split(".")[1:]
        folder = REPO / (parts[0] if parts[0] in ("relay", "metering", "policies") else "mailmeter")
        rest = parts[1:] if parts[0] in ("relay", "metering", "policies") else parts
        path = folder.joinpath(*rest)
        if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
            missing.append(module)
    files = set(re.findall(r"`((?:relay|metering|policies|mailmeter)/[\w/]*?(?:\.py|/))`", text))
    missing += [name for name in sorted(files) if not (REPO / name).exists()]
    assert missing == []


# docs/operating.md#a-day-of-operation and README's excerpt of it: made by docs/day_of_operation.py.
DAY_HEADING = "## A day of operation"


def _day_section() -> str:
    text = (REPO / "docs" / "operating.md").read_text()
    start = text.index(DAY_HEADING + "\n")
    return text[start : text.index("\n## ", start + len(DAY_HEADING))]


def _console(markdown: str) -> list[tuple[str, list[str]]]:
    """Each `$ command` of the console blocks of a markdown text, with the lines it printed."""
    shown: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", markdown, re.DOTALL):
        for line in block.splitlines():
            if line.startswith("$ "):
                shown.append((line[2:], []))
            elif shown and line and not line.startswith(("C: ", "S: ", "# ")):
                shown[-1][1].append(line)
    return shown


def _day_script() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("day_of_operation", REPO / "docs" / "day_of_operation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_of_the_day_is_a_mailmeter_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `mailmeter ...` the day shows parses with the real command's parser (a renamed
    command or option fails here), and README's excerpt is the day's commands and outputs."""
    from mailmeter.cli import build_parser

    shown = _console(_day_section())
    commands = [command.split(" | ")[-1] for command, _ in shown]
    mailmeter = [command for command in commands if command.startswith("mailmeter ")]
    assert len(mailmeter) >= 25
    for command in mailmeter:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit as exit:  # --version prints and exits 0; a bad command exits 2
            assert exit.code == 0, (command, capsys.readouterr().err)
    for needed in ("queue list", "queue show", "queue hold", "queue release", "queue flush", "queue delete",
                   "account add", "account show", "account change", "account rate", "account suspend",
                   "account resume", "usage", "db backup", "audit", "--version"):  # fmt: skip
        assert any(command.startswith(f"mailmeter {needed}") for command in mailmeter), needed
    readme = (REPO / "README.md").read_text()
    excerpt = readme[readme.index("<!-- day of operation: start -->") : readme.index("<!-- day of operation: end -->")]
    day = dict(reversed(shown))  # a command shown twice (queue list): its first output
    for command, output in _console(excerpt):
        assert command in day, command
        kept = [line for line in output if line != "..."]
        assert kept == day[command][: len(kept)], command
    assert "docs/operating.md#a-day-of-operation" in readme


def _shape(output: list[str]) -> list[str]:
    """What stays from run to run: each line's first word, with queue ids and numbers made alike."""
    alike = [re.sub(r"\d+", "N", re.sub(r"\b[0-9A-F]{21}\b", "QID", line)) for line in output]
    return [line.split(" ")[0] for line in alike]


def test_the_day_runs_end_to_end_as_the_docs_show(tmp_path: Path) -> None:
    """docs/day_of_operation.py runs against a real relay, and its commands print what the
    docs show, up to queue ids, times and ports."""
    script = _day_script()
    day = script.Day(tmp_path)
    try:
        day.start()
        script.the_day(day)
    finally:
        day.stop()
    ran = [(re.sub(r"\b[0-9A-F]{21}\b", "QID", c), _shape(o.splitlines())) for c, o in day.transcript]
    documented = [(re.sub(r"\b[0-9A-F]{21}\b", "QID", c), _shape(o)) for c, o in _console(_day_section())]
    ran = [(re.sub(r"(kill -HUP |localhost:)\d+", r"\1N", c), o) for c, o in ran]  # a pid, a port
    documented = [(re.sub(r"(kill -HUP |localhost:)\d+", r"\1N", c), o) for c, o in documented]
    assert ran == documented
    text = day.markdown()
    assert "upstream 1 127.0.0.1:" in text and "  down until " in text and "Connection refused" in text
    assert '"needs_restart": ["delivery.workers"]' in text and "-rw------- " in text
    assert "S: 452 4.7.1 Sending is suspended" in text and "451 4.7.1 Sending rate 4/minute reached" in text

"""The project's own documentation of the billing models stays true and self-contained.

- every quoted sentence of docs/billing-models.md is, word for word, on the provider's
  page it cites (the pages are kept outside the repository, in the team's shared
  folder: without them the check is skipped);
- every config key the page says expresses a model is what config.example.yaml has;
- no user-facing file points at a file outside the repository.
"""

from __future__ import annotations

import os
import re
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


def test_no_user_facing_file_points_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"BILLING_MODELS|seeds/|\.\./shared|/work/shared")
    offenders = [
        name
        for name in files
        if not name.startswith(("tests/", ".ci/"))
        and (REPO / name).is_file()
        and outside.search((REPO / name).read_text(encoding="utf-8", errors="replace"))
    ]
    assert offenders == []


def test_the_docs_link_to_each_other_and_exist() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/billing-models.md" in readme and "docs/delivery-results.md" in readme
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([\w.-]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), (page.name, target)

"""The rows of docs/delivery-results.md's tables: the upstream reply, and the category and
sub-type it must bill as. Both the policy test and the real-upstream test read them, so
the documentation, the code and the relay cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "delivery-results.md"
CATEGORY = {"Delivered": "delivered", "Soft Bounce": "soft_bounced", "Invalid Email": "hard_bounced"}
_ROW = re.compile(r"\| `([2-5]\d\d)([ -][^`]*)` \|[^|]*\| ([A-Za-z ]+?) \|\s*([A-Za-z ]*?)\s*\|")


@dataclass(frozen=True)
class Row:
    reply: str  # what the upstream answers, e.g. "552 5.2.2 Mailbox full"
    category: str  # delivered | soft_bounced | hard_bounced
    reason: str  # "" | mailbox_full | ... (snake case of the doc's sub-type)

    @property
    def code(self) -> int:
        return int(self.reply[:3])


def rows() -> list[Row]:
    found = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = _ROW.fullmatch(line.strip())
        if match:
            code, text, category, reason = match.groups()
            found.append(Row(code + text, CATEGORY[category], reason.strip().lower().replace(" ", "_")))
    return found

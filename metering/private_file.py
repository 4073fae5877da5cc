"""Files only their owner may read: a backup of the meter holds every account's password hash."""

from __future__ import annotations

import os
from pathlib import Path

OWNER_ONLY = 0o600


def create_owner_only(target: Path) -> None:
    """Create `target` empty with mode 0600 whatever the umask (the mode is set on the open
    descriptor, before a byte is written); FileExistsError if it exists: a backup never
    overwrites a file."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    except FileExistsError:
        raise FileExistsError(f"{target} exists; choose a new file for the backup") from None
    try:
        os.fchmod(fd, OWNER_ONLY)  # a permissive umask only narrows 0600; a restrictive one never widens it
    finally:
        os.close(fd)


__all__ = ["OWNER_ONLY", "create_owner_only"]

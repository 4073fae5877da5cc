"""Domain names as the relay compares them: one canonical ASCII form per domain.

A sender domain is compared with an account's domains in this form only. ASCII
names are lowercased in ASCII alone: `str.lower()` maps non-ASCII look-alikes onto
ASCII letters (the Kelvin sign U+212A becomes "k", U+0130 becomes "i" plus a dot),
which would let `ex\u212aample.com` pass as `example.com`. Internationalized names become
their A-label (`xn--...`) under IDNA 2008 (the `idna` package, strict: no UTS 46
mapping), which refuses the Kelvin sign and other disallowed code points outright.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

import idna

_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_LDH_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class DomainError(ValueError):
    """Not a domain name the relay can compare or register."""


def canonical_domain(domain: str) -> str:
    """The domain's canonical ASCII form (lowercase; IDNs as A-labels), without a final dot.

    Raises DomainError for anything that is not a host name: empty labels, characters
    outside letters, digits and hyphens, a label over 63 octets, a name over 253, or a
    non-ASCII name IDNA 2008 does not allow.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise DomainError("an empty domain name")
    if not name.isascii():
        # Lowercase each non-ASCII letter only into another non-ASCII one ("Ü" -> "ü"); one
        # that would become ASCII (the Kelvin sign) stays and IDNA 2008 refuses it.
        name = "".join(c.lower() if not c.lower().isascii() else c.translate(_ASCII_UPPER) for c in name)
        try:
            name = idna.encode(name, uts46=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as error:
            look_alike = next((c for c in name if unicodedata.normalize("NFKC", c) != c), None)
            if look_alike is not None:
                raise DomainError(
                    f"it holds U+{ord(look_alike):04X} ({unicodedata.name(look_alike, 'a compatibility character')}),"
                    f" a look-alike of {unicodedata.normalize('NFKC', look_alike)!r} that IDNA 2008 does not allow"
                    " in a domain name; write the domain with its own letters"
                ) from None
            raise DomainError(f"not a valid internationalized domain name ({error})") from None
    name = name.translate(_ASCII_UPPER)
    labels = name.split(".")
    if len(name) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in labels):
        raise DomainError("a domain name is letters, digits and hyphens in dot-separated labels of 1-63")
    return name


def domain_allowed(domain: str, allowed: Collection[str]) -> bool:
    """Whether `domain`, as a client sent it, is one of the canonical domains `allowed`.

    An ASCII domain (nearly all mail) is lowercased in ASCII and looked up as it is; a
    non-ASCII one must be a valid IDN whose A-label is allowed (a domain registered
    before canonical forms, as its U-label, matches too).
    """
    name = domain[:-1] if domain.endswith(".") else domain
    if name.isascii():
        return name.translate(_ASCII_UPPER) in allowed
    try:
        wanted = canonical_domain(name)
    except DomainError:
        return False
    return wanted in allowed or any(_canonical_or_none(known) == wanted for known in allowed if not known.isascii())


def _canonical_or_none(domain: str) -> str | None:
    try:
        return canonical_domain(domain)
    except DomainError:
        return None

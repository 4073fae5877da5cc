"""Client networks bound to accounts, looked up by longest prefix in a few dictionary probes.

A relay answers "which account is this client's network bound to?" on every new
connection. With 10,000 accounts each bound to a network, testing the address
against every binding in turn cost milliseconds per connection (issue 19 item 5).
Here the bindings are grouped by IP version and prefix length, each group a dict
from network address to account name: a lookup masks the address once per prefix
length in use (at most 33 for IPv4, 129 for IPv6), longest first, and stops at the
first hit, whatever the number of bindings.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

_BITS = {4: 32, 6: 128}


@dataclass(frozen=True)
class Bindings:
    """`rows`: the (network, account) pairs as the store gave them, to tell a changed set from
    an unchanged one; `groups`: (version, prefix length, mask, {network address: account}),
    longest prefix first."""

    rows: tuple[tuple[str, str], ...]
    groups: tuple[tuple[int, int, int, dict[int, str]], ...]

    @classmethod
    def build(cls, rows: Sequence[tuple[str, str]]) -> Bindings:
        """Among bindings of the same network, the first row's account wins."""
        tables: dict[tuple[int, int], dict[int, str]] = {}
        for network, name in rows:
            version, address, prefix = _parse(network)
            table = tables.setdefault((version, prefix), {})
            table.setdefault(address & _mask(version, prefix), name)
        groups = tuple(
            (version, prefix, _mask(version, prefix), tables[version, prefix])
            for version, prefix in sorted(tables, key=lambda key: key[1], reverse=True)
        )
        return cls(rows=tuple(rows), groups=groups)

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The account whose bound network holds `address` with the longest prefix; None if none does."""
        value, version = int(address), address.version
        for group_version, _, mask, table in self.groups:
            if group_version == version:
                name = table.get(value & mask)
                if name is not None:
                    return name
        return None


def _parse(network: str) -> tuple[int, int, int]:
    """(IP version, address as an integer, prefix length) of a stored network ("198.18.0.5/32").

    inet_pton, not ipaddress: 10,000 bindings parse in milliseconds, not a fifth of a
    second of the event loop's time. Anything inet_pton does not take goes to ipaddress.
    """
    address, _, prefix = network.partition("/")
    family, version = (socket.AF_INET6, 6) if ":" in address else (socket.AF_INET, 4)
    try:
        value = int.from_bytes(socket.inet_pton(family, address), "big")
        length = int(prefix) if prefix else _BITS[version]
        if not 0 <= length <= _BITS[version]:
            raise ValueError(network)
    except (OSError, ValueError):
        net = ipaddress.ip_network(network, strict=False)
        return net.version, int(net.network_address), net.prefixlen
    return version, value, length


def _mask(version: int, prefix: int) -> int:
    bits = _BITS[version]
    return ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)


__all__ = ["Bindings"]

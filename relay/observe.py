"""What the relay reports for metrics, as a narrow interface (relay/ imports no metrics library)."""

from __future__ import annotations

from typing import Protocol


class RelayObserver(Protocol):
    def session_opened(self) -> None: ...
    def session_closed(self) -> None: ...
    def transaction(self, reply_class: str, reason: str) -> None: ...
    def accepted(self, recipients: int, account: str | None = None) -> None: ...
    def meter_call(self, operation: str, seconds: float) -> None: ...
    def delivery_result(self, result: str, recipients: int) -> None: ...
    def refused(self, command: str, code: str, account: str | None) -> None: ...
    def auth(self, result: str) -> None: ...
    def auth_lockout(self, scope: str) -> None: ...


class NoObserver:
    """The default: observe nothing."""

    def session_opened(self) -> None:
        pass

    def session_closed(self) -> None:
        pass

    def transaction(self, reply_class: str, reason: str) -> None:
        pass

    def accepted(self, recipients: int, account: str | None = None) -> None:
        pass

    def meter_call(self, operation: str, seconds: float) -> None:
        pass

    def delivery_result(self, result: str, recipients: int) -> None:
        pass

    def refused(self, command: str, code: str, account: str | None) -> None:
        """A 4xx or 5xx reply to `command` ("-": before any command was read whole)."""

    def auth(self, result: str) -> None:
        """An AUTH's outcome: ok, failed, locked or tempfail."""

    def auth_lockout(self, scope: str) -> None:
        """A lockout began, of a client or a login."""


def reply_class(reply: str) -> str:
    """'2xx', '4xx' or '5xx' from a reply line; 'none' when no reply was given."""
    return f"{reply[0]}xx" if reply[:1] in ("2", "3", "4", "5") else "none"

"""The YAML config: validated whole at start, so a bad file fails before anything listens.

Relative paths are relative to the config file's directory, so the example config
runs as it is from a checkout. Errors name the dotted key and what is wrong.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mailmeter.apiauth import ApiTokens, TokenFileError, parse_tokens
from mailmeter.policies.currency import Currency, currency_for
from mailmeter.policies.plans import Plan, PlanError, parse_plans


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    name: str = "node1"
    region: str = "default"


class ListenConfig(_Section):
    """One listening socket (relay/smtpd.py's Listener says what mode and auth mean)."""

    address: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    processes: int = Field(1, ge=1, le=64)  # relay processes sharing the ports (SO_REUSEPORT); mailmeter/workers.py
    mode: Literal["smtp", "submission", "smtps"] = "smtp"
    auth: Literal["optional", "required", "none"] = "optional"

    def label(self) -> str:
        """How the listener is named in logs: MODE ADDRESS:PORT."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.mode} {host}:{self.port}"

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class TlsConfig(_Section):
    certificate: Path | None = None
    key: Path | None = None


class AuthConfig(_Section):
    allow_plaintext_on_loopback: bool = False


class LimitsConfig(_Section):
    message_size: int = Field(25 * 1024 * 1024, ge=1024)
    recipients_per_message: int = Field(100, ge=1)
    session_timeout: float = Field(300.0, gt=0)
    session_max_duration: float = Field(900.0, gt=0)
    bare_newlines: Literal["reject", "normalize"] = "reject"


class AbuseConfig(_Section):
    max_connections_per_client: int = Field(50, ge=1)
    auth_max_failures: int = Field(5, ge=1)
    auth_failure_window: float = Field(600.0, gt=0)
    auth_lockout: float = Field(900.0, ge=0)
    auth_failure_delay: float = Field(1.0, ge=0)
    auth_failure_delay_max: float = Field(8.0, ge=0)
    auth_checks_per_client: int = Field(2, ge=1, le=1000)  # password checks (scrypt) in flight per client
    auth_checks_in_flight: int = Field(8, ge=1, le=1000)  # ... and on this relay process, all clients


class UpstreamSection(_Section):
    host: str
    port: int = Field(25, ge=1, le=65535)
    tls: Literal["none", "starttls", "tls"] = "starttls"
    verify_certificate: bool = True
    username: str | None = None
    password_file: Path | None = None
    timeout: float = Field(30.0, gt=0)


class DeliveryConfig(_Section):
    workers: int = Field(4, ge=1, le=256)
    retry_first_delay: float = Field(300.0, gt=0)
    retry_factor: float = Field(2.0, ge=1)
    retry_max_delay: float = Field(4000.0, gt=0)
    max_age: float = Field(5 * 86400.0, gt=0)
    upstream_down_seconds: float = Field(30.0, gt=0)  # a failed upstream is skipped this long (relay/upstreams.py)


class DatabaseConfig(_Section):
    """SQLite at `path` (one node), or, when `url` is set, PostgreSQL shared by every node."""

    path: Path = Path("var/mailmeter.db")
    url: str | None = None  # postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?search_path=SCHEMA]
    pool_size: int = Field(10, ge=1, le=500)  # PostgreSQL connections this node keeps at most
    lease_emails: int = Field(50, ge=0, le=1_000_000)  # PostgreSQL: block of an allowance a node borrows; 0: off
    lease_seconds: float = Field(1.0, gt=0, le=3600)  # PostgreSQL: a lease is renewed or given back after this
    busy_timeout_ms: int = Field(5000, ge=0, le=600_000)  # SQLite: wait this long for a lock, then 451


def check_database_url(url: str) -> None:
    """Raise ConfigError (naming database.url) unless `url` is a usable PostgreSQL URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        scheme = f"{parts.scheme}:" if parts.scheme else "a URL without a scheme"
        raise ConfigError(  # never the URL itself: it may hold a password
            f"database.url: {scheme} is not a PostgreSQL URL; write it like"
            " postgresql://mailmeter@db.example.net:5432/mailmeter (or remove the key to use database.path)"
        )
    try:
        parts.port  # noqa: B018 (reading it raises ValueError for a port that is not a number)
    except ValueError:
        raise ConfigError("database.url: the port is not a number from 1 to 65535") from None
    if not parts.path.strip("/"):
        raise ConfigError("database.url: name the database after the host, like postgresql://HOST:5432/mailmeter")


def database_label(config: Config) -> str:
    """The database as the operator configured it, never with a password."""
    if config.database.url is None:
        return str(config.resolve(config.database.path))
    parts = urlsplit(config.database.url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username
    return f"{parts.scheme}://{f'{user}@' if user else ''}{host}{parts.path}"


class SpoolConfig(_Section):
    path: Path = Path("var/spool")
    # The inline spool (issue 19 item 3; relay/spool.py): on an SQLite node, a message up to
    # inline_max_bytes (with its envelope line and Received header) is kept in the
    # transaction that commits its usage instead of a spool file: one fsync for both, and
    # about 30% less server CPU per message in bench/run. PostgreSQL nodes, and larger
    # messages, always use the files; `inline: false` puts every message in the files.
    inline: bool = True
    inline_max_bytes: int = Field(64 * 1024, ge=0, le=16 * 1024 * 1024)


class GatewayConfig(_Section):
    kind: Literal["none", "webhook"] = "none"
    url: str | None = None
    secret_file: Path | None = None
    timeout: float = Field(10.0, gt=0)


class NoticesConfig(_Section):
    from_address: str | None = None
    webhook_url: str | None = None
    webhook_secret_file: Path | None = None


class BillingConfig(_Section):
    interval: float = Field(60.0, gt=0)
    currency: str = "USD"  # ISO 4217, one for every plan; its minor units say how amounts are written
    charge_retry_first_delay: float = Field(30.0, gt=0)
    charge_retry_max_delay: float = Field(3600.0, gt=0)
    gateway: GatewayConfig = GatewayConfig()
    notices: NoticesConfig = NoticesConfig()


class EventsConfig(_Section):
    """Webhook delivery of account events (mailmeter/events.py)."""

    interval: float = Field(5.0, gt=0)  # seconds between passes over the outbox
    max_attempts: int = Field(8, ge=1, le=100)
    first_delay: float = Field(30.0, gt=0)  # the wait after the first failed attempt, doubling
    max_delay: float = Field(3600.0, gt=0)
    timeout: float = Field(10.0, gt=0)  # seconds a receiver has to answer
    keep_days: float = Field(30.0, gt=0)  # delivered and failed events are kept this long


class ApiConfig(_Section):
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = Field(8025, ge=0, le=65535)
    tokens_file: Path | None = None
    payment_webhook_secret_file: Path | None = None
    webhook_tolerance: float = Field(300.0, gt=0)

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class PortalConfig(_Section):
    """The account holder's pages (mailmeter/portal/, docs/portal.md), on their own listener."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = Field(8026, ge=0, le=65535)
    tls: bool = False  # serve HTTPS with tls.certificate and tls.key (cookies are then Secure)
    secure_cookies: bool = False  # mark cookies Secure though served as HTTP (behind an HTTPS proxy)
    session_idle: float = Field(1800.0, gt=0)  # seconds without a request that end a session
    session_max: float = Field(43200.0, gt=0)  # seconds after sign-in that end a session

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    node: NodeConfig = NodeConfig()
    hostname: str = "localhost"
    listen: tuple[ListenConfig, ...] = (ListenConfig(),)  # one listener (a mapping), or a list of them
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    abuse: AbuseConfig = AbuseConfig()
    upstream: tuple[UpstreamSection, ...]  # one smarthost (a mapping), or an ordered list of them
    delivery: DeliveryConfig = DeliveryConfig()
    database: DatabaseConfig = DatabaseConfig()
    spool: SpoolConfig = SpoolConfig()
    billing: BillingConfig = BillingConfig()
    api: ApiConfig = ApiConfig()
    events: EventsConfig = EventsConfig()
    portal: PortalConfig = PortalConfig()
    log: LogConfig = LogConfig()
    plans: dict[str, Any] = Field(default_factory=dict)

    base_dir: Path = Path(".")

    @field_validator("listen", mode="before")
    @classmethod
    def _one_listener_or_several(cls, value: Any) -> Any:
        """`listen:` is one listener (a mapping) or a list of them; the first is the node's main one."""
        return [value] if isinstance(value, dict) else value

    @property
    def processes(self) -> int:
        """Relay processes of this node (`processes` of the first listener)."""
        return self.listen[0].processes

    @field_validator("upstream", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        """`upstream:` is one smarthost (a mapping) or an ordered list of them."""
        return [value] if isinstance(value, dict) else value

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    def currency(self) -> Currency:
        """The billing currency, `billing.currency`."""
        try:
            return currency_for(self.billing.currency)
        except ValueError as error:
            raise ConfigError(f"billing.currency: {error}") from None

    def parsed_plans(self) -> dict[str, Plan]:
        """Every plan, in the billing currency: an amount it cannot express is refused."""
        currency = self.currency()
        try:
            return parse_plans(self.plans, currency=currency)
        except PlanError as error:
            raise ConfigError(f"{error.key}: {error.message}") from None

    def read_secret(self, key: str, path: Path | None) -> bytes | None:
        if path is None:
            return None
        resolved = self.resolve(path)
        try:
            secret = resolved.read_bytes().strip()
        except OSError as error:
            raise ConfigError(f"{key}: cannot read {resolved}: {error.strerror}") from None
        if not secret:
            raise ConfigError(f"{key}: {resolved} is empty; put the shared secret on its first line")
        return secret

    def api_tokens(self) -> ApiTokens:
        """The admin API's named bearer tokens, read from `api.tokens_file`."""
        if self.api.tokens_file is None:
            raise ConfigError("api.tokens_file: the admin API needs a file of NAME:TOKEN lines")
        path = self.resolve(self.api.tokens_file)
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"api.tokens_file: cannot read {path}: {error.strerror}") from None
        try:
            return parse_tokens(text)
        except TokenFileError as error:
            raise ConfigError(f"api.tokens_file: {path}: {error}") from None

    def upstream_password(self, index: int = 0) -> str | None:
        """The password of upstream number `index` (from 0) in the list."""
        upstream = self.upstream[index]
        if upstream.password_file is None:
            return None
        path = self.resolve(upstream.password_file)
        key = "upstream.password_file" if len(self.upstream) == 1 else f"upstream.{index}.password_file"
        try:
            return path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{key}: cannot read {path}: {error.strerror}") from None


def _describe(error: ValidationError, single: tuple[str, ...] = ()) -> str:
    """One line naming each bad key. With `upstream:` or `listen:` (named in `single`) written
    as one mapping, its keys are named as written (upstream.port), not by their place in the
    list (upstream.0.port)."""
    problems = []
    for item in error.errors():
        loc = list(item["loc"])
        if loc[:2] in (["upstream", 0], ["listen", 0]) and loc[0] in single:
            loc = [loc[0], *loc[2:]]
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config.example.yaml)"
        elif item["type"] == "missing":
            message = "is required"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


def check_listeners(config: Config) -> None:
    """Raise ConfigError naming the listener key that cannot work."""
    listeners = config.listen
    if not listeners:
        raise ConfigError("listen: list at least one listener (address, port, mode)")
    single = len(listeners) == 1
    seen: set[tuple[str, int]] = set()
    for index, listen in enumerate(listeners):
        key = "listen" if single else f"listen.{index}"
        if index and "processes" in listen.model_fields_set and listen.processes != listeners[0].processes:
            raise ConfigError(
                f"{key}.processes: the node's process count is set on the first listener only; remove it here"
            )
        if config.processes > 1 and listen.port == 0:
            raise ConfigError(f"{key}.processes: several processes share one port; set {key}.port to a fixed port")
        if listen.mode != "smtp" and (config.tls.certificate is None or config.tls.key is None):
            raise ConfigError(
                f"{key}.mode: {listen.mode} needs TLS; set tls.certificate and tls.key"
                " (or use mode smtp on this listener)"
            )
        plaintext = config.auth.allow_plaintext_on_loopback and ipaddress.ip_address(listen.address).is_loopback
        if listen.auth == "required" and config.tls.certificate is None and not plaintext:
            raise ConfigError(
                f"{key}.auth: required, but AUTH is offered only inside TLS and tls is not set:"
                " nobody could send here; set tls.certificate and tls.key"
            )
        if listen.port and (listen.address, listen.port) in seen:
            raise ConfigError(f"{key}: {listen.address}:{listen.port} is listed twice; list each socket once")
        seen.add((listen.address, listen.port))


def load_config(path: Path) -> Config:
    """Read, validate and resolve a config file, or raise ConfigError naming the key."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of sections")
    if "base_dir" in data:
        raise ConfigError("base_dir: unknown key (check the spelling against config.example.yaml)")
    data["base_dir"] = path.resolve().parent
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        single = tuple(key for key in ("upstream", "listen") if isinstance(data.get(key), dict))
        raise ConfigError(_describe(error, single)) from None
    tls = config.tls
    if (tls.certificate is None) != (tls.key is None):
        raise ConfigError("tls: set both certificate and key, or neither")
    check_listeners(config)
    for key, value in (("tls.certificate", tls.certificate), ("tls.key", tls.key)):
        if value is not None and not config.resolve(value).is_file():
            raise ConfigError(f"{key}: file {config.resolve(value)} does not exist")
    loopback = [listen for listen in config.listen if ipaddress.ip_address(listen.address).is_loopback]
    if config.auth.allow_plaintext_on_loopback and not loopback:
        raise ConfigError(
            "auth.allow_plaintext_on_loopback: the relay listens on "
            f"{', '.join(listen.address for listen in config.listen)}, not loopback;"
            " plaintext AUTH is only allowed on loopback"
        )
    if not config.plans:
        raise ConfigError("plans: define at least one plan")
    if config.database.url is not None:
        check_database_url(config.database.url)
    config.parsed_plans()
    if not config.upstream:
        raise ConfigError("upstream: list at least one smarthost (host, port, ...)")
    seen: set[tuple[str, int]] = set()
    for index, upstream in enumerate(config.upstream):
        if (upstream.host, upstream.port) in seen:
            raise ConfigError(
                f"upstream.{index}: {upstream.host}:{upstream.port} is listed twice; list each smarthost once"
            )
        seen.add((upstream.host, upstream.port))
        config.upstream_password(index)
    gateway = config.billing.gateway
    if gateway.kind == "webhook":
        if not gateway.url or not gateway.url.startswith(("http://", "https://")):
            raise ConfigError("billing.gateway.url: set the http(s) URL the webhook gateway POSTs charges to")
        if gateway.secret_file is None:
            raise ConfigError("billing.gateway.secret_file: the webhook gateway needs a file with the HMAC secret")
        config.read_secret("billing.gateway.secret_file", gateway.secret_file)
    notices = config.billing.notices
    if notices.webhook_url is not None and notices.webhook_secret_file is None:
        raise ConfigError("billing.notices.webhook_secret_file: a notices webhook needs a file with the HMAC secret")
    config.read_secret("billing.notices.webhook_secret_file", notices.webhook_secret_file)
    if config.api.enabled:
        config.api_tokens()
    if config.portal.enabled and config.portal.tls and (tls.certificate is None or tls.key is None):
        raise ConfigError("portal.tls: serving the portal over HTTPS needs tls.certificate and tls.key")
    config.read_secret("api.payment_webhook_secret_file", config.api.payment_webhook_secret_file)
    return config

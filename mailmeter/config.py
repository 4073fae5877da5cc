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
    address: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    processes: int = Field(1, ge=1, le=64)  # relay processes sharing the port (SO_REUSEPORT); mailmeter/workers.py

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


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    node: NodeConfig = NodeConfig()
    hostname: str = "localhost"
    listen: ListenConfig = ListenConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    abuse: AbuseConfig = AbuseConfig()
    upstream: UpstreamSection
    delivery: DeliveryConfig = DeliveryConfig()
    database: DatabaseConfig = DatabaseConfig()
    spool: SpoolConfig = SpoolConfig()
    billing: BillingConfig = BillingConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    plans: dict[str, Any] = Field(default_factory=dict)

    base_dir: Path = Path(".")

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

    def upstream_password(self) -> str | None:
        if self.upstream.password_file is None:
            return None
        path = self.resolve(self.upstream.password_file)
        try:
            return path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"upstream.password_file: cannot read {path}: {error.strerror}") from None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config.example.yaml)"
        elif item["type"] == "missing":
            message = "is required"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


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
        raise ConfigError(_describe(error)) from None
    tls = config.tls
    if (tls.certificate is None) != (tls.key is None):
        raise ConfigError("tls: set both certificate and key, or neither")
    if config.listen.processes > 1 and config.listen.port == 0:
        raise ConfigError("listen.processes: several processes share one port; set listen.port to a fixed port")
    for key, value in (("tls.certificate", tls.certificate), ("tls.key", tls.key)):
        if value is not None and not config.resolve(value).is_file():
            raise ConfigError(f"{key}: file {config.resolve(value)} does not exist")
    if config.auth.allow_plaintext_on_loopback and not ipaddress.ip_address(config.listen.address).is_loopback:
        raise ConfigError(
            "auth.allow_plaintext_on_loopback: the relay listens on "
            f"{config.listen.address}, not loopback; plaintext AUTH is only allowed on loopback"
        )
    if not config.plans:
        raise ConfigError("plans: define at least one plan")
    if config.database.url is not None:
        check_database_url(config.database.url)
    config.parsed_plans()
    config.upstream_password()
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
    config.read_secret("api.payment_webhook_secret_file", config.api.payment_webhook_secret_file)
    return config

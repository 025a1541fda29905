"""Settings read from the environment (and `.env`), validated once at start."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IdList = Annotated[frozenset[int], NoDecode]
UrlList = Annotated[tuple[str, ...], NoDecode]
NumberTypeSetting = Literal["auto", "meta", "web"]
_TOKEN = re.compile(r"^\d+:[A-Za-z0-9_-]{20,}$")
# plain http is only for a webhook URL on this machine (tests, a local TLS terminator)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # `NAME=` in .env means "not set"
        extra="ignore",
        validate_default=True,
    )

    bot_token: SecretStr
    telegram_api_url: AnyHttpUrl | None = None
    # webhook mode (several replicas): Telegram POSTs updates to this URL's path on the web app;
    # without it the bot uses long polling (one process)
    telegram_webhook_url: AnyHttpUrl | None = None
    telegram_webhook_secret: SecretStr | None = None  # X-Telegram-Bot-Api-Secret-Token
    telegram_webhook_max_connections: int = Field(default=40, ge=1, le=100)

    pilot_status_api_key: SecretStr | None = None
    pilot_status_api_key_id: SecretStr | None = None
    pilot_status_base_url: AnyHttpUrl = AnyHttpUrl("https://pilotstatus.com.br")
    pilot_status_number_type: NumberTypeSetting = "auto"
    # For a tenant-scoped key: which number to act on (header x-whatsapp-number-id).
    pilot_status_number_id: str | None = None
    pilot_status_connect_timeout: float = Field(default=5.0, gt=0, le=60)
    pilot_status_read_timeout: float = Field(default=20.0, gt=0, le=300)
    pilot_status_max_connections: int = Field(default=20, ge=1, le=1000)
    pilot_status_max_retries: int = Field(default=2, ge=0, le=10)
    pilot_status_retry_backoff: float = Field(default=0.5, ge=0, le=30)

    operator_ids: IdList = frozenset()
    admin_ids: IdList = frozenset()
    allowed_chat_ids: IdList = frozenset()

    # storage: a SQLite file under DATA_DIR unless DATABASE_URL names PostgreSQL
    database_url: SecretStr | None = None
    data_dir: Path = Path("data")
    # shared short-lived state of replicas (confirmations, seen updates, guards, waiters)
    redis_url: SecretStr | None = None
    redis_key_prefix: str = Field(default="callbot:", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    # the web app (same process): Pilot Status webhooks, health. Off unless a token is set.
    pilot_status_webhook_token: SecretStr | None = None
    pilot_status_webhook_secret: SecretStr | None = None
    web_host: str = "0.0.0.0"
    web_port: int = Field(default=8080, ge=0, le=65535)
    # slow and idle clients: seconds for a request's headers, for its body, idle between requests
    web_header_timeout: float = Field(default=10.0, gt=0, le=300)
    web_body_timeout: float = Field(default=30.0, gt=0, le=600)
    web_keepalive_timeout: float = Field(default=75.0, gt=0, le=3600)
    # open connections at most; past it the longest-waiting idle one is closed
    web_max_connections: int = Field(default=512, ge=8, le=100_000)
    webhook_max_body: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # alert intake has its own limit: an Alertmanager group of a few hundred alerts is ~300 KB
    alert_max_body: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # when set, GET /metrics needs `Authorization: Bearer <token>` (401 otherwise)
    metrics_token: SecretStr | None = None
    # without webhooks, each call is polled until it ends
    call_poll_interval: float = Field(default=2.0, gt=0, le=60)
    call_poll_timeout: float = Field(default=900.0, gt=0, le=86400)
    # at most one edit of a call's message per this many seconds (Telegram's limits)
    telegram_edit_interval: float = Field(default=1.0, ge=0, le=60)
    # a message edit that Telegram fails (5xx, network, long flood wait) is retried this long
    telegram_edit_give_up_after: float = Field(default=900.0, ge=1, le=86400)
    # Telegram's send limits, waited for before each send or edit (shared through REDIS_URL);
    # 0 turns one off
    telegram_sends_per_second: int = Field(default=30, ge=0, le=10_000)
    telegram_group_sends_per_minute: int = Field(default=20, ge=0, le=10_000)
    telegram_chat_sends_per_second: int = Field(default=1, ge=0, le=1000)

    # on-call: contacts and teams may also come from a TOML file, loaded at every start
    oncall_file: Path | None = None
    # per-destination throttles of on-call rings: calls/seconds, comma separated
    oncall_throttle: str = "1/60,3/900"
    # how often due escalation steps are looked for (0 turns the timer off)
    oncall_tick_seconds: float = Field(default=1.0, ge=0, le=60)
    # alerts of one team per minute that get a post of their own; the rest of that minute's
    # share a digest post (Telegram allows a group 20 messages a minute, edits included)
    oncall_posts_per_minute: int = Field(default=5, ge=0, le=20)
    # a step taken is reserved this long, renewed while it runs: it is retaken after a crash
    oncall_lease_seconds: float = Field(default=15.0, ge=0.1, le=600)
    # outbound heartbeat: requested (GET) every minute while the escalation engine is healthy,
    # e.g. a healthchecks.io ping URL; unset: none
    heartbeat_url: SecretStr | None = None
    # on SIGTERM/SIGINT, seconds to let updates, calls being started (and their replies) and
    # escalation steps in flight finish; SHUTDOWN_DRAIN_SECONDS is its old name, still read
    shutdown_grace_seconds: float = Field(
        default=20.0,
        ge=0,
        le=600,
        validation_alias=AliasChoices("shutdown_grace_seconds", "shutdown_drain_seconds"),
    )

    # retention: deliveries, rings and permission requests deleted, calls' numbers and notes
    # removed after this many days; how often that is looked for (0 turns the job off)
    retention_days: int = Field(default=90, ge=1, le=36500)
    retention_interval_seconds: float = Field(default=3600.0, ge=0, le=86400)

    # voice: the bot's own WebRTC endpoint for Meta numbers, and spoken messages on any call
    stun_servers: UrlList = ("stun:stun.l.google.com:19302",)  # `none` for no STUN
    # the softphone's browser leg on Meta numbers (bot.softphone): a TURN relay for operators
    # behind networks that block direct UDP; its credential goes only to a browser that may join
    turn_url: str | None = None
    turn_username: str | None = None
    turn_password: SecretStr | None = None
    media_max_calls: int = Field(default=10, ge=1, le=500)
    media_answer_timeout: float = Field(default=20.0, gt=0, le=120)
    media_connect_timeout: float = Field(default=10.0, gt=0, le=120)
    call_ring_timeout: float = Field(default=60.0, gt=0, le=600)
    speech_engine: str = "espeak-ng"
    speech_repeat: int = Field(default=2, ge=1, le=5)
    speech_words_per_minute: int = Field(default=150, ge=80, le=450)
    # where Pilot Status can fetch audio the bot serves (/play on web numbers); else realtime
    public_base_url: AnyHttpUrl | None = None
    realtime_sample_rate: int = Field(default=16_000, ge=8_000, le=48_000)
    # the Mini App softphone (PUBLIC_BASE_URL/app/): initData older than this is refused; the
    # short name registered with BotFather (/newapp) makes group links t.me/<bot>/<name>
    miniapp_init_data_max_age: int = Field(default=3600, ge=60, le=86400)
    miniapp_short_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{3,30}$")

    default_region: str = "BR"
    default_locale: Literal["en", "pt_BR"] = "en"
    confirm_ttl_seconds: int = Field(default=60, ge=5, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # names this replica in every JSON log line
    instance_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)

    @field_validator("operator_ids", "admin_ids", "allowed_chat_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p for p in re.split(r"[,\s]+", value) if p]
            bad = [p for p in parts if not re.fullmatch(r"-?\d+", p)]
            if bad:
                raise ValueError(f"not Telegram ids: {', '.join(bad)}")
            return frozenset(int(p) for p in parts)
        return value

    @field_validator("stun_servers", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().lower() == "none":
                return ()
            urls = tuple(p for p in re.split(r"[,\s]+", value) if p)
            bad = [u for u in urls if not re.fullmatch(r"stuns?:[\w.-]+(:\d{1,5})?", u)]
            if bad:
                raise ValueError(f"not STUN URLs (stun:host:port): {', '.join(bad)}")
            return urls
        return value

    @field_validator("turn_url")
    @classmethod
    def _turn_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(
            r"turns?:[\w.-]+(:\d{1,5})?(\?transport=(udp|tcp))?", value
        ):
            raise ValueError("not a TURN URL (turn:host:port, turns:host:port?transport=tcp)")
        return value

    @field_validator("turn_password", mode="after")
    @classmethod
    def _turn_credentials(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("turn_url") is not None and (
            value is None or not info.data.get("turn_username")
        ):
            raise ValueError("TURN_URL needs TURN_USERNAME and TURN_PASSWORD")
        return value

    @field_validator("pilot_status_webhook_token")
    @classmethod
    def _unguessable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{24,}", value.get_secret_value()):
            raise ValueError(
                "use 24 or more letters, digits, - or _ (it is the webhook's secret path)"
            )
        return value

    @field_validator("telegram_webhook_url")
    @classmethod
    def _webhook_https(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is None:
            return None
        if value.scheme != "https" and value.host not in LOOPBACK_HOSTS:
            raise ValueError("use the public https:// URL Telegram will POST updates to")
        return value

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            if info.data.get("telegram_webhook_url") is not None:
                raise ValueError("required with TELEGRAM_WEBHOOK_URL (1-256 of A-Z a-z 0-9 _ -)")
            return None
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()):
            raise ValueError("use 1 to 256 letters, digits, _ or - (Telegram's rule)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://", value.get_secret_value()):
            raise ValueError("use a redis:// (or rediss://) URL, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("heartbeat_url")
    @classmethod
    def _heartbeat_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        url = value.get_secret_value().strip()
        if not re.fullmatch(r"https?://[^\s/]+\S*", url):
            raise ValueError("must be an http(s) URL")
        return SecretStr(url)

    @field_validator("oncall_throttle")
    @classmethod
    def _throttle(cls, value: str) -> str:
        if not re.fullmatch(r"\s*(\d+/\d+\s*(,\s*\d+/\d+\s*)*)?", value):
            raise ValueError("write limits as calls/seconds, e.g. 1/60,3/900")
        return value

    @field_validator("bot_token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        if not _TOKEN.match(value.get_secret_value()):
            raise ValueError("does not look like a token from @BotFather (digits:letters)")
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        import phonenumbers

        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("not a two-letter region code such as BR or US")
        return region

    @field_validator("default_locale", mode="before")
    @classmethod
    def _locale(cls, value: object) -> object:
        if isinstance(value, str) and value.replace("-", "_").lower() in {"pt", "pt_br"}:
            return "pt_BR"
        return value

    # Cross-field checks as field validators (validate_default), so they are reported together
    # with every other bad variable instead of only once all fields are valid.
    @field_validator("pilot_status_api_key_id", mode="after")
    @classmethod
    def _one_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None and info.data.get("pilot_status_api_key") is None:
            raise ValueError("set PILOT_STATUS_API_KEY (or PILOT_STATUS_API_KEY_ID)")
        return value

    @field_validator("admin_ids", mode="after")
    @classmethod
    def _someone_calls(cls, value: frozenset[int], info: ValidationInfo) -> frozenset[int]:
        if not value and info.data.get("operator_ids") == frozenset():
            raise ValueError("set OPERATOR_IDS or ADMIN_IDS: nobody could place a call")
        return value

    @property
    def webhook_mode(self) -> bool:
        """Updates come by Telegram webhook (TELEGRAM_WEBHOOK_URL), not by long polling."""
        return self.telegram_webhook_url is not None

    @property
    def caller_ids(self) -> frozenset[int]:
        """Everyone who may start calls: operators and admins."""
        return self.operator_ids | self.admin_ids


class ConfigError(Exception):
    """The environment does not make a valid configuration; the message names each variable."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        raise ConfigError(describe_errors(err)) from None


def describe_errors(err: ValidationError) -> str:
    lines = ["callbot cannot start, the configuration is incomplete:"]
    for item in err.errors(include_input=False, include_url=False):
        where = "_".join(str(p) for p in item["loc"]).upper()
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "missing: set it in .env (see .env.example)"
        lines.append(f"  - {where}: {message}" if where else f"  - {message}")
    return "\n".join(lines)

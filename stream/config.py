"""The one typed settings object: environment variables (``METERWATCH_*``) and CLI flags.

Every field is a CLI flag of ``meterwatch run`` (``--bootstrap-servers`` for
``bootstrap_servers``) and an environment variable (``METERWATCH_BOOTSTRAP_SERVERS``); a
flag wins over the environment. Secrets are ``SecretStr``: they never appear in logs or
``repr``. The README's configuration table is generated from this class
(``meterwatch config --markdown``).

An environment variable that is empty or only whitespace counts as NOT set: the default
applies (``METERWATCH_SSL_CAFILE=`` as a Kubernetes manifest or docker-compose's
``${VAR:-}`` writes it). Decided in one place, ``blank``, for every setting.
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "METERWATCH_"
_SASL_FIELDS = ("sasl_mechanism", "sasl_username", "sasl_password")
_SSL_FIELDS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


def flag(name: str) -> str:
    """The CLI flag of a settings field: ``batch_max_size`` -> ``--batch-max-size``."""
    return "--" + name.replace("_", "-")


def blank(value: object) -> bool:
    """An environment variable's value that means "not set": empty or only whitespace."""
    return isinstance(value, str) and not value.strip()


def env_value(name: str, prefix: str = ENV_PREFIX) -> str | None:
    """The environment variable of setting ``name`` (``METERWATCH_<NAME>``), or None when it
    is not set or ``blank``."""
    value = os.environ.get(f"{prefix}{name.upper()}")
    return None if value is None or blank(value) else value


#: What ``meterwatch run --help`` and the docs say of the environment.
ENV_NOTE = (f"Each setting is also an environment variable, {ENV_PREFIX}<FLAG> (see each "
            "flag); a flag wins over it, and a variable that is empty or only whitespace "
            "counts as not set (the default applies).")


class _NonBlankEnv:
    """The environment source with empty and whitespace-only values left out (not set), so
    that each setting's default applies, as when the variable is absent."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        self.source = source
        self.__name__ = type(source).__name__  # the name pydantic-settings files it under

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.source().items() if not blank(v)}


class SettingsError(ValueError):
    """Settings that cannot be used: one line naming the flag, what is wrong and the fix."""


class Settings(BaseSettings):
    """Settings of the meterwatch service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid",
                                      allow_inf_nan=False)  # no "inf" seconds

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource) -> tuple[Any, ...]:
        """Flags (init), then the environment without its ``blank`` variables;
        no .env file or secrets directory is configured."""
        return (init_settings, _NonBlankEnv(env_settings), dotenv_settings,
                file_secret_settings)

    # Kafka
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    group_id: str = Field("meterwatch", description="consumer group id")
    input_topic: str = Field("meterwatch.readings", description="readings topic (key = household)")
    alerts_topic: str = Field("meterwatch.alerts", description="alerts output topic")
    scores_topic: str = Field("meterwatch.scores",
                              description="one record per closed household-day (the ledger)")
    dead_letter_topic: str = Field("meterwatch.dead-letter", description="rejected records")
    data_quality_topic: str = Field("meterwatch.data-quality",
                                    description="incomplete and imputed days")
    state_topic: str = Field("meterwatch.state",
                             description="compacted changelog of household state and marks")
    create_topics: bool = Field(True, description="create missing output topics at start")
    topic_partitions: int = Field(8, ge=1, description="partitions of topics created at start")
    replication_factor: int | None = Field(
        None, ge=1, le=32767, description="replication factor of topics created at start "
        "(unset: the input topic's)")
    client_id: str = Field("meterwatch", description="Kafka client id")
    idempotence: Literal["auto", "on", "off"] = Field(
        "auto", description="idempotent producer: auto = on where the broker supports it")
    session_timeout_ms: int = Field(
        10_000, ge=2000, description="group session timeout (heartbeats every quarter of it)")
    fetch_max_wait_ms: int = Field(
        25, ge=0, description="longest a fetch waits for data (brokers that do not wake a "
        "waiting fetch, like Tansu, add up to this much latency); raised, up to 5 s, while "
        "fetches come back empty although records wait")
    fetch_max_records: int = Field(5000, ge=1, description="records per fetch")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (with SASL_SSL or SASL_PLAINTEXT)")
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never printed)")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' "
                                    "certificates (SSL, SASL_SSL)")
    ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="client private key (mutual TLS)")
    broker_retry_max_s: float = Field(10.0, gt=0, description="longest backoff between retries")

    # Day assembly
    timezone: str = Field("UTC", description="time zone of day boundaries (IANA name)")
    grace_s: float = Field(3600.0, ge=0, description="watermark grace before closing a day")
    max_imputed_slots: int = Field(4, ge=0, le=47,
                                   description="missing slots a closed day may have and be scored")
    max_future_s: float = Field(86400.0, ge=0,
                                description="readings further ahead of the wall clock: rejected")
    household_idle_evict_days: int = Field(
        60, ge=1, le=100_000,
        description="a household silent this many days is evicted from memory and starts "
                    "again from population statistics when it returns")

    # Model and batching
    model_path: Path | None = Field(None, description="checkpoint (meterwatch train)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs: auto = CUDA when there is a GPU")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="inference precision (bfloat16/float16 on a GPU)")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads for CPU inference; default half the cores "
        "(at most 4), leaving the event loop a core")
    scorer: Literal["process", "thread"] = Field(
        "process", description="where the model runs: a scorer process (the event loop keeps "
        "its interpreter; ~2-4 s to start) or a worker thread of the service")
    target_far: float | None = Field(
        None, ge=1e-5, le=0.3,
        description="alert budget: false alarms per normal household-day (0.005 = 1 in 200); "
        "the threshold comes from the checkpoint's calibration curve; default: the "
        "checkpoint's own threshold")
    calibration: Literal["rolling", "fixed"] = Field(
        "fixed", description="with --target-far: fixed = the checkpoint's curve (held the "
        "budget within x1.5 on unseen households, docs/serving.md); rolling = the threshold "
        "follows the last 28 days of live scores (for fleets that drift; anomalies in live "
        "traffic raise it)")
    model_poll_s: float = Field(
        5.0, ge=0, description="how often --model-path is checked for a new checkpoint, "
        "swapped in without a restart (SIGHUP: at once), and --shadow-model-path, "
        "--household-info, --weather and --holidays for a new version, read again; 0 = on "
        "SIGHUP only")
    shadow_model_path: Path | None = Field(
        None, description="a second checkpoint that scores every batch too, never published; "
        "its agreement with the live model is in the meterwatch_shadow_* metrics")
    household_info: Path | None = Field(
        None, description="household CSV: household_id,tariff,group (or LCL's LCLid,"
        "stdorToU,Acorn_grouped)")
    weather: Path | None = Field(
        None, description="daily weather CSV: date,temp_max,temp_min in °C (or Dark Sky's "
        "time,temperatureMax,temperatureMin)")
    holidays: Path | None = Field(
        None, description="bank holidays CSV: a date column (or LCL's 'Bank holidays')")
    batch_max_size: int = Field(65536, ge=1, description="upper bound of a model batch (days)")
    batch_max_delay_ms: float = Field(10.0, ge=0,
                                      description="longest a closed day waits for a batch")
    queue_max_days: int = Field(200_000, ge=1,
                                description="closed days waiting before partitions pause")
    top_slots: int = Field(6, ge=1, le=48, description="half-hours listed in an alert")

    # Operations
    gc_gen0_threshold: int = Field(
        50_000, ge=0, description="garbage-collector gen-0 threshold while the service runs "
        "(0 leaves Python's default, 700); start-up objects are also frozen out of collections")
    commit_interval_s: float = Field(1.0, gt=0, description="offset commit period")
    metrics_host: str = Field("0.0.0.0", description="bind address of /metrics and probes")
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 = pick a free port")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="bound of a graceful shutdown")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (for log shippers)")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as UTC or "
                             "Europe/London") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        proto = self.security_protocol
        if proto.startswith("SASL"):
            for name in _SASL_FIELDS:
                if not getattr(self, name):
                    raise ValueError(f"{flag(name)}: required with --security-protocol {proto}; "
                                     f"set {flag(name)} (or {ENV_PREFIX}{name.upper()})")
        else:
            given = [n for n in _SASL_FIELDS if getattr(self, n)]
            if given:
                raise ValueError(
                    f"{flag(given[0])}: SASL settings are given but --security-protocol is "
                    f"{proto}, which would ignore them; use --security-protocol SASL_SSL (or "
                    "SASL_PLAINTEXT), or remove the SASL settings")
        if proto not in ("SSL", "SASL_SSL"):
            given = [n for n in _SSL_FIELDS if getattr(self, n)]
            if given:
                raise ValueError(
                    f"{flag(given[0])}: TLS files are given but --security-protocol is {proto}, "
                    "which would ignore them; use --security-protocol SSL (or SASL_SSL), or "
                    "remove them")
        for name in _SSL_FIELDS:
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag(name)}: no such file {str(path)!r}; give the path of "
                                 "a PEM file")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-keyfile: --ssl-certfile and --ssl-keyfile go together; "
                             "give both or neither")
        if proto in ("SSL", "SASL_SSL"):
            check_tls_files(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
        return self

    # -- validation that never prints input values ------------------------------------------
    @classmethod
    def load(cls, **given: Any) -> Settings:
        """Settings from flags (``given``) over ``METERWATCH_*``; errors as ``SettingsError``.

        pydantic's own message echoes the input value (a password too); this one names the
        flag (and the environment variable when the value came from there) and says what is
        wrong, never the value.
        """
        try:
            return cls(**given)
        except ValidationError as exc:
            raise SettingsError(describe_error(exc, set(given))) from None

    def summary(self) -> str:
        """Effective settings on one line, ``name=value`` separated by spaces; secrets masked."""
        parts = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "***"
            elif value is None:
                continue
            else:
                text = str(value)
            parts.append(f"{name}={text}")
        return " ".join(parts)

    def kafka_options(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka client."""
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "client_id": self.client_id,
                                "security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None)
        if self.security_protocol.startswith("SASL") and self.sasl_password is not None:
            opts.update(sasl_mechanism=self.sasl_mechanism,
                        sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password.get_secret_value())
        return opts

    # -- CLI ---------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser,
                      only: tuple[str, ...] | None = None) -> None:
        """One ``--flag`` per field; values are validated by pydantic, not argparse, so that
        a flag and its environment variable get the same checks and messages. The help shows
        the default, the choices and the environment variable."""
        group = parser.add_argument_group("settings (each also an environment variable)",
                                          ENV_NOTE)
        for name, f in cls.model_fields.items():
            if only is not None and name not in only:
                continue
            help_ = f.description or ""
            choices = field_choices(name)
            if choices:
                help_ += f" {{{','.join(choices)}}}"
            if f.default is not None:
                help_ += f" (default: {f.default})"
            help_ = f"{help_.strip()}; env {ENV_PREFIX}{name.upper()}"
            meta = name.upper() if not choices else "{" + ",".join(choices) + "}"
            if f.annotation is bool:
                group.add_argument(flag(name), action=argparse.BooleanOptionalAction,
                                   default=None, help=help_)
            else:
                group.add_argument(flag(name), default=None, help=help_.replace("%", "%%"),
                                   metavar=meta if choices else name.upper())

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Settings:
        given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        return cls.load(**{**given, **overrides})

    @classmethod
    def markdown_table(cls) -> str:
        rows = ["| setting | env | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in cls.model_fields.items():
            default = "" if f.default is None else f"`{f.default}`"
            choices = field_choices(name)
            meaning = (f.description or "") + (
                f" (one of {', '.join(f'`{c}`' for c in choices)})" if choices else "")
            rows.append(f"| `{flag(name)}` | `{ENV_PREFIX}{name.upper()}` | "
                        f"{default} | {meaning} |")
        return "\n".join(rows)


def field_choices(name: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` setting (empty for other settings)."""
    ann = Settings.model_fields[name].annotation
    for arg in (ann, *typing.get_args(ann)):
        if typing.get_origin(arg) is Literal:
            return tuple(str(a) for a in typing.get_args(arg))
    return ()


def check_tls_files(cafile: Path | None, certfile: Path | None,
                    keyfile: Path | None) -> None:
    """``ValueError`` naming the flag when a TLS file is not what it must be: the CA bundle a
    PEM file of certificates, the client certificate and key a PEM pair that matches (a
    key with a passphrase cannot be used: there is no setting for one)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=str(cafile))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"--ssl-cafile: {str(cafile)!r} holds no PEM certificate "
                             f"({_tls_reason(exc)}); give the PEM file of the CA that signed "
                             "the brokers' certificates") from None
    if certfile is not None and keyfile is not None:
        try:
            context.load_cert_chain(str(certfile), str(keyfile), password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"--ssl-certfile: {str(certfile)!r} and --ssl-keyfile "
                             f"{str(keyfile)!r} are not a PEM certificate and its unencrypted "
                             f"key ({_tls_reason(exc)}); give both as PEM files") from None


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted")  # never OpenSSL's prompt on the terminal


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason code (``NO_CERTIFICATE_OR_CRL_FOUND``), never the file's content."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if type(exc) is ValueError:
        return str(exc)
    return getattr(exc, "strerror", None) or type(exc).__name__


def describe_error(exc: ValidationError, from_flags: set[str] | None = None) -> str:
    """One line for the first problem in ``exc``: the flag, what is wrong and the fix.

    Built from each error's location and message only: pydantic's ``input_value`` (which
    would print a password given in the wrong combination) is never used.
    """
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(x) for x in err.get("loc", ())]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:  # a model-level check: its message starts with the flag
        return msg
    name = loc[0]
    if name not in Settings.model_fields:
        return f"{flag(name)}: unknown setting; see meterwatch run --help"
    where = flag(name)
    if from_flags is not None and name not in from_flags and env_value(name) is not None:
        where = f"{where} (from {ENV_PREFIX}{name.upper()})"
    choices = field_choices(name)
    fix = (f"choose one of {', '.join(choices)}" if choices
           else "see meterwatch run --help")
    if err.get("type") == "value_error":  # our own validators say the fix themselves
        return f"{where}: {msg}"
    if err.get("type") == "literal_error" or ("Input should be" in msg and choices):
        msg = "not one of the allowed values"
    return f"{where}: {msg[0].lower() + msg[1:] if msg else msg}; {fix}"

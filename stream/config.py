"""The one typed settings object: environment variables (``METERWATCH_*``) and CLI flags.

Every field is a CLI flag of ``meterwatch run`` (``--bootstrap-servers`` for
``bootstrap_servers``) and an environment variable (``METERWATCH_BOOTSTRAP_SERVERS``); a
flag wins over the environment. Secrets are ``SecretStr``: they never appear in logs or
``repr``. The README's configuration table is generated from this class
(``meterwatch config --markdown``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the meterwatch service."""

    model_config = SettingsConfigDict(env_prefix="METERWATCH_", frozen=True, extra="forbid")

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
    client_id: str = Field("meterwatch", description="Kafka client id")
    idempotence: Literal["auto", "on", "off"] = Field(
        "auto", description="idempotent producer: auto = on where the broker supports it")
    session_timeout_ms: int = Field(
        10_000, ge=2000, description="group session timeout (heartbeats every quarter of it)")
    fetch_max_wait_ms: int = Field(
        25, ge=0, description="longest a fetch waits for data (brokers that do not wake a "
        "waiting fetch, like Tansu, add up to this much latency)")
    fetch_max_records: int = Field(5000, ge=1, description="records per fetch")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads for CPU inference; default half the cores "
        "(at most 4), leaving the event loop a core")
    scorer: Literal["process", "thread"] = Field(
        "process", description="where the model runs: a scorer process (the event loop keeps "
        "its interpreter; ~2-4 s to start) or a worker thread of the service")
    household_info: Path | None = Field(None, description="household info CSV (ACORN, tariff)")
    weather: Path | None = Field(None, description="daily weather CSV")
    holidays: Path | None = Field(None, description="bank holidays CSV")
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not (
                self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError("SASL needs sasl_mechanism, sasl_username and sasl_password")
        return self

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
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None
            opts.update(sasl_mechanism=self.sasl_mechanism,
                        sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password.get_secret_value())
        return opts

    # -- CLI ---------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field; values are validated by pydantic, not argparse."""
        for name, f in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_ = (f.description or "") + f" (env METERWATCH_{name.upper()})"
            if f.annotation is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_)
            else:
                parser.add_argument(flag, default=None, help=help_)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> Settings:
        given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        return cls(**{**given, **overrides})

    @classmethod
    def markdown_table(cls) -> str:
        rows = ["| setting | env | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in cls.model_fields.items():
            default = "" if f.default is None else f"`{f.default}`"
            rows.append(f"| `--{name.replace('_', '-')}` | `METERWATCH_{name.upper()}` | "
                        f"{default} | {f.description or ''} |")
        return "\n".join(rows)

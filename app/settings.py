"""All configuration of the service, from POE_* environment variables (or a .env file)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Blobs, the SQLite file, work directories.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    blob_url: str | None = Field(
        None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$",
        description="s3://bucket/prefix: blobs in an S3-compatible bucket shared by every replica and worker "
                    "(credentials and endpoint from the AWS_* variables), data_dir/blobs their local cache; "
                    "default: blobs in data_dir/blobs alone.")
    admin_token: str | None = Field(None, description="Bearer token of the admin API.")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories extraction jobs may read data sets from (os.pathsep separated); "
                    "default data_dir/datasets.")
    default_pool: str | None = Field(
        None, description="Pool bundle to import at first start; default the shipped pool; 'none' for none.")
    auto_migrate: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    model_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)
    active_pool_ttl: float = Field(1.0, ge=0, description="Seconds the active pool version is cached.")
    native_lane: bool = Field(True, description="Answer plain POST /models queries in C (app.serving.native) "
                                                "where the extension is built.")
    stats_flush_seconds: float = Field(5.0, gt=0)
    worker_poll_seconds: float = Field(1.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    stale_seconds: float = Field(60.0, gt=0, description="A running job silent this long is stale.")
    job_max_attempts: int = Field(2, ge=1, description="Runs of a job, resumes after a dead worker included.")
    train_nproc: int = Field(1, ge=1, le=64, description="Training processes per extraction job: above 1, "
                                                         "`poe worker` trains under torchrun (one per GPU).")
    require_worker: bool = Field(False, description="/ready fails while no worker is alive (`poe serve` "
                                                    "sets it when it runs one).")
    public_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
                                   description="Base URL of download links; default relative links.")

    @field_validator("blob_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        # docker-compose passes an unset variable as an empty one
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_paths(cls, value):
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> Settings:
        if self.stale_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("POE_STALE_SECONDS must exceed twice POE_HEARTBEAT_SECONDS, or live jobs "
                             "would be taken for dead")
        return self

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.data_dir / 'poe.db').resolve()}"

    @property
    def embedded(self) -> bool:
        """The one-machine default: SQLite and everything under data_dir."""
        return self.db_url.startswith("sqlite")

    @cached_property
    def allowed_data_roots(self) -> list[Path]:
        return [p.resolve() for p in (self.data_roots or [self.data_dir / "datasets"])]

    @property
    def blob_dir(self) -> Path:
        """The blobs, or with blob_url this host's cache of the bucket's."""
        return self.data_dir / "blobs"

    @property
    def pools_dir(self) -> Path:
        """Pool versions laid out as bundle directories, for poe_core to load."""
        return self.data_dir / "pools"

    @property
    def work_dir(self) -> Path:
        """Extraction work directories (checkpoints, oracle and library weights)."""
        return self.data_dir / "work"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"

"""Every setting of the service, read from ``APP_*`` environment variables (and a ``.env`` file).

Nothing reads the environment on import: ``Settings()`` is built once by the entry point (or by a
test) and handed to ``create_app``. Components take the few values they need as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DType = Literal["bfloat16", "float16", "float32"]


class Settings(BaseSettings):
    """The service's configuration; invalid values are refused at start-up, not at the first task."""

    model_config = SettingsConfigDict(env_prefix="APP_", env_file=".env", extra="ignore")

    # --- HTTP ---
    host: str = "0.0.0.0"  # noqa: S104 - a container's service listens on every interface
    port: int = 8000
    # Comma-separated Bearer keys (``sk_a,sk_b``); empty means the API is open.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    metrics_enabled: bool = True
    metrics_require_auth: bool = False
    log_level: str = "info"

    # --- storage and limits ---
    data_dir: Path = Path("./data")
    max_upload_mb: int = Field(default=200, gt=0)  # MiB, uploads and URL downloads alike
    max_pages: int = Field(default=500, gt=0)  # pages per task, after the ``pages`` selection
    max_page_pixels: int = Field(
        default=40_000_000, gt=0
    )  # pixels per rendered page; larger pages are scaled down
    max_dpi: int = Field(default=300, gt=0)  # the highest ``dpi`` a task may ask for
    result_ttl_hours: float = Field(default=72, gt=0)  # hours a finished task is kept
    url_allow_private: bool = False  # allow URL tasks to reach loopback/private/link-local hosts
    url_connect_timeout_seconds: float = Field(default=10, gt=0)
    url_read_timeout_seconds: float = Field(default=60, gt=0)  # per read, not for the whole download
    url_max_redirects: int = Field(default=5, ge=0)

    # --- job system ---
    queue_max: int = Field(default=100, gt=0)  # tasks waiting (not running) before submit answers 429
    max_workers: int = Field(default=1, gt=0)  # tasks processed at once

    # --- model and engine ---
    backend: Literal["hf"] = "hf"
    ds_model_path: str | None = None  # unset: chosen for this environment (see engines.resolve)
    force_cpu: bool = False
    ds_dtype: DType = "bfloat16"
    ds_use_flash_attn: bool = True  # used only when CUDA and the flash_attn package are present
    ds_base_size: int = Field(default=1024, gt=0)  # px, v1 global view
    ds_image_size: int = Field(default=640, gt=0)  # px, v1 tile size
    ds_crop_mode: bool = True  # tile large pages ("gundam")
    ds_prompt_override: str | None = None
    ds_max_new_tokens: int = Field(default=8192, gt=0)  # tokens per page
    ds_no_repeat_ngram_size: int = Field(default=20, ge=0)  # 0 turns the guard off
    ds_batch_size: int = Field(default=4, gt=0)  # pages per generate() call
    page_timeout_seconds: float = Field(default=300, gt=0)  # wall time per generate() call
    model_idle_seconds: float = Field(default=600, gt=0)  # unload the model after this long unused
    gpu_min_free_mb: int = Field(default=2048, ge=0)  # MiB free on the GPU before a task starts
    gpu_poll_seconds: float = Field(default=2.0, gt=0)
    hf_download_timeout_seconds: float = Field(default=30, gt=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # The environment gives ``sk_a, sk_b``; pydantic-settings would parse a list as JSON.
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("ds_model_path", "ds_prompt_override", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

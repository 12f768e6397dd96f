"""Every setting of the service, read from ``APP_*`` environment variables (and a ``.env`` file).

Nothing reads the environment on import: ``Settings()`` is built once by the entry point (or by a
test) and handed to ``create_app``. Components take the few values they need as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DType = Literal["auto", "bfloat16", "float16", "float32"]


class Settings(BaseSettings):
    """The service's configuration; invalid values are refused at start-up, not at the first task."""

    # hide_input_in_errors: a refused setting must not print the secrets beside it (keys, passwords).
    model_config = SettingsConfigDict(
        env_prefix="APP_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    # --- HTTP ---
    # Unset: every interface (0.0.0.0) with APP_API_KEYS, this machine only (127.0.0.1) without; see
    # ``listen_host``. The images, the compose files and the chart set 0.0.0.0 explicitly.
    host: str | None = None
    port: int = 8000
    # Comma-separated Bearer keys (``sk_a,sk_b``); empty (and no APP_TENANTS_FILE) means the API is open.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Tenants (see app.tenants and README "Tenants"): their hashed keys, roles, weights and limits.
    # Both this and APP_API_KEYS apply when both are set. Reloaded when it changes.
    tenants_file: Path | None = None
    tenants_poll_seconds: float = Field(default=2, gt=0)  # s, how often the file is read for changes
    metrics_enabled: bool = True
    metrics_require_auth: bool = False
    log_level: str = "info"
    ui_enabled: bool = True  # the web console at /ui (``/`` redirects there)

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

    # --- request bodies (see app.api.body_limits); uploads are bounded by APP_MAX_UPLOAD_MB ---
    max_json_body_kb: int = Field(default=64, gt=0)  # KiB, any request body that is not a multipart upload

    # --- job system ---
    queue_max: int = Field(default=100, gt=0)  # tasks waiting (not running) before submit answers 429
    max_workers: int = Field(default=1, gt=0)  # tasks processed at once
    events_ping_seconds: float = Field(default=15, gt=0)  # s, keep-alive comment on idle event streams
    # Held connections (see app.api.stream_caps): event streams and long-polls (``?wait=``) open at once
    # in this process, per API key and in all; past either, 429. With auth off every caller is the one
    # anonymous owner, so the per-key cap bounds them all together.
    max_streams_per_key: int = Field(default=200, gt=0)  # connections
    max_streams_total: int = Field(default=500, gt=0)  # connections

    # --- document rendering (see app.pipeline.render_pool) ---
    # Opening, checking and rendering documents run in these processes, shared by uploads and tasks;
    # a request past a limit kills its process (the upload is refused, the task fails naming the page).
    render_processes: int = Field(default=2, gt=0)  # processes
    render_page_seconds: float = Field(default=60, gt=0)  # s, wall time per page render or upload check
    render_memory_mb: int = Field(default=3072, ge=256)  # MiB of address space per process (RLIMIT_AS)

    # --- scale-out (see README "Scaling out"): API replicas and workers sharing Redis and S3 ---
    # all: one process accepts and processes; api: accepts, lists, streams, serves; worker: processes.
    role: Literal["all", "api", "worker"] = "all"
    queue_backend: Literal["memory", "redis"] = "memory"  # redis: records, queue and events in Redis
    redis_url: str | None = None  # e.g. redis://redis:6379/0; needed by APP_QUEUE_BACKEND=redis
    storage_backend: Literal["local", "s3"] = "local"  # s3: inputs, previews, results in APP_S3_BUCKET
    # s, a running task whose worker stops renewing its lease this long is delivered to another worker.
    visibility_timeout_seconds: float = Field(default=120, gt=0)
    s3_redirect_downloads: bool = False  # s3 storage: downloads answer 307 to a presigned URL
    # s, how long a Redis command waits for a free connection of this process's bounded pool (sized
    # from APP_MAX_STREAMS_TOTAL and APP_MAX_WORKERS, see app.storage.redis_conn) before a 503.
    redis_pool_timeout_seconds: float = Field(default=5, gt=0)

    # --- model and engine ---
    backend: Literal["hf", "vllm"] = "hf"  # vllm: see the "vLLM" block below
    ds_model_path: str | None = None  # unset: chosen for this environment (see engines.resolve)
    force_cpu: bool = False
    ds_dtype: DType = "auto"  # bfloat16 on CUDA, float32 on CPU (where bf16 is several times slower)
    ds_use_flash_attn: bool = True  # used only when CUDA and the flash_attn package are present
    ds_base_size: int = Field(default=1024, gt=0)  # px, v1 global view
    ds_image_size: int = Field(default=640, gt=0)  # px, v1 tile size
    ds_crop_mode: bool = True  # tile large pages ("gundam")
    ds_prompt_override: str | None = None
    ds_max_new_tokens: int = Field(default=8192, gt=0)  # tokens per page
    ds_no_repeat_ngram_size: int = Field(default=20, ge=0)  # 0 turns the guard off
    ds_batch_size: int = Field(default=4, gt=0)  # pages per generate() call
    page_timeout_seconds: float = Field(default=300, gt=0)  # wall time per generate() call
    # The retry ladder (app.tasks.options.ladder): attempts a suspect page gets after its first;
    # each costs about a page's time. 0 turns it off.
    page_retries: int = Field(default=2, ge=0, le=5)  # attempts per page
    # A page whose text agrees less than this (0-1) with its PDF text layer is suspect.
    quality_min_agreement: float = Field(default=0.5, ge=0, le=1)
    model_idle_seconds: float = Field(default=600, gt=0)  # unload the model after this long unused
    gpu_min_free_mb: int = Field(default=2048, ge=0)  # MiB free on the GPU before a task starts
    gpu_poll_seconds: float = Field(default=2.0, gt=0)
    hf_download_timeout_seconds: float = Field(default=30, gt=0)

    # --- vLLM (APP_BACKEND=vllm; see app.engines.vllm) ---
    # Base URL of an OpenAI-compatible server (vllm serve, SGLang, transformers serve), e.g.
    # http://vllm:8000 (a trailing /v1 is accepted); unset: vLLM inside this process.
    vllm_url: str | None = None
    # Model name sent to the server; unset: the first one its /v1/models lists. In-process: the
    # checkpoint vLLM loads (unset: APP_DS_MODEL_PATH, else deepseek-ai/DeepSeek-OCR).
    vllm_model: str | None = None
    vllm_api_key: SecretStr | None = None  # Bearer key for the server
    vllm_concurrency: int = Field(default=16, gt=0)  # page requests in flight, across all tasks
    # Tokens per page (replaces APP_DS_MAX_NEW_TOKENS). Unset: as many as the server's context leaves
    # after the prompt (max_model_len from its /v1/models; in-process, vLLM's own). Set: an upper bound,
    # still clamped to that room, since vLLM refuses a request whose prompt plus max_tokens overflows.
    vllm_max_tokens: int | None = Field(default=None, gt=0)
    vllm_timeout_seconds: float = Field(default=600, gt=0)  # s, per page request (queueing included)
    vllm_retries: int = Field(default=3, ge=0)  # extra attempts after a failed request; backoff doubles
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # in-process only
    vllm_max_model_len: int | None = Field(default=None, gt=0)  # tokens, in-process only; unset: model's
    # What the server is, for the extras it accepts (auto: /v1/models' owned_by; openai: none).
    vllm_server_kind: Literal["auto", "vllm", "sglang", "openai"] = "auto"

    @field_validator("vllm_url")
    @classmethod
    def _vllm_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.strip().lower().startswith(("http://", "https://")):
            raise ValueError(f"APP_VLLM_URL must be an http:// or https:// URL, not {value!r}")
        return value

    # --- publishing results to object storage (see app.storage.publish) ---
    # local: nothing is uploaded, "publish" hands out signed share links to this service instead.
    publish_backend: Literal["local", "s3", "oss"] = "local"
    auto_publish: bool = False  # publish every task that succeeds, in the background
    publish_max_attempts: int = Field(default=3, gt=0)  # tries per file before a publish fails
    publish_backoff_seconds: float = Field(default=1.0, gt=0)  # s, first wait between tries; doubles
    s3_endpoint_url: str | None = None  # unset: AWS; MinIO, R2, OSS...: their endpoint URL
    s3_region: str = "us-east-1"
    s3_bucket: str | None = None
    s3_access_key_id: str | None = None  # unset with the secret: boto3's own chain (env, IAM role)
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_prefix: str = ""  # objects go under <prefix>/<task_id>/
    # Alibaba OSS, reached through its S3-compatible API (virtual-hosted, as Alibaba documents).
    oss_endpoint: str | None = None  # e.g. https://s3.oss-cn-hangzhou.aliyuncs.com
    oss_bucket: str | None = None
    oss_access_key_id: str | None = None
    oss_access_key_secret: SecretStr | None = None
    oss_prefix: str = ""
    oss_sign_expire_seconds: int = Field(default=3600, gt=0, le=604_800)  # s, life of published links

    # --- webhooks (see app.storage.webhooks) ---
    webhook_secret: SecretStr | None = None  # HMAC-SHA256 key; tasks may set callback_url only with it
    webhook_max_attempts: int = Field(default=5, gt=0)
    webhook_backoff_seconds: float = Field(default=2.0, gt=0)  # s, first wait between tries; doubles
    webhook_timeout_seconds: float = Field(default=10, gt=0)  # s, per delivery attempt

    # --- share links (see app.storage.links) ---
    link_secret: SecretStr | None = None  # unset: random per process, so links die with a restart
    link_expire_seconds: int = Field(default=3600, gt=0)  # s, default life of a share link
    link_max_expire_seconds: int = Field(default=604_800, gt=0)  # s, longest life a link may ask for
    link_base_url: str | None = None  # public URL of this service, for absolute links; unset: relative

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # The environment gives ``sk_a, sk_b``; pydantic-settings would parse a list as JSON.
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator(
        "ds_model_path",
        "ds_prompt_override",
        "vllm_url",
        "vllm_model",
        "vllm_api_key",
        "vllm_max_tokens",
        "vllm_max_model_len",
        "s3_endpoint_url",
        "s3_bucket",
        "s3_access_key_id",
        "s3_secret_access_key",
        "oss_endpoint",
        "oss_bucket",
        "oss_access_key_id",
        "oss_access_key_secret",
        "webhook_secret",
        "link_secret",
        "link_base_url",
        "redis_url",
        "host",
        "tenants_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # ``APP_S3_BUCKET=`` in a compose file or a chart means "not set", not a bucket named "".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_publishing(self) -> Settings:
        """Refuse incomplete publish settings at start-up, naming every missing variable."""
        missing: list[str] = []
        if self.publish_backend == "s3":
            if self.s3_bucket is None:
                missing.append("APP_S3_BUCKET")
            # One key without the other is a typo, never a choice; neither means boto3's own chain.
            if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
                missing.append(
                    "APP_S3_ACCESS_KEY_ID" if self.s3_access_key_id is None else "APP_S3_SECRET_ACCESS_KEY"
                )
        elif self.publish_backend == "oss":
            required = {
                "APP_OSS_ENDPOINT": self.oss_endpoint,
                "APP_OSS_BUCKET": self.oss_bucket,
                "APP_OSS_ACCESS_KEY_ID": self.oss_access_key_id,
                "APP_OSS_ACCESS_KEY_SECRET": self.oss_access_key_secret,
            }
            missing = [name for name, value in required.items() if value is None]
        if missing:
            raise ValueError(
                f"APP_PUBLISH_BACKEND={self.publish_backend} needs {', '.join(missing)}; set them or "
                "use APP_PUBLISH_BACKEND=local"
            )
        self._check_scale_out()
        if self.link_expire_seconds > self.link_max_expire_seconds:
            raise ValueError("APP_LINK_EXPIRE_SECONDS is above APP_LINK_MAX_EXPIRE_SECONDS")
        return self

    def _check_scale_out(self) -> None:
        """Refuse combinations that cannot work: processes on several machines share Redis and S3."""
        scaled = self.queue_backend == "redis"
        if scaled and self.redis_url is None:
            raise ValueError("APP_QUEUE_BACKEND=redis needs APP_REDIS_URL")
        if scaled != (self.storage_backend == "s3"):
            raise ValueError(
                "APP_QUEUE_BACKEND=redis and APP_STORAGE_BACKEND=s3 go together: processes on several "
                "machines need both the shared queue and the shared bucket; set both, or neither"
            )
        if self.role != "all" and not scaled:
            raise ValueError(
                f"APP_ROLE={self.role} needs APP_QUEUE_BACKEND=redis and APP_STORAGE_BACKEND=s3: a single "
                "process with the in-memory queue must be APP_ROLE=all"
            )
        if self.storage_backend == "s3":
            if self.s3_bucket is None:
                raise ValueError("APP_STORAGE_BACKEND=s3 needs APP_S3_BUCKET")
            if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
                raise ValueError(
                    "APP_S3_ACCESS_KEY_ID and APP_S3_SECRET_ACCESS_KEY are set together or not at all"
                )

    @property
    def listen_host(self) -> str:
        """The address ``python -m app`` listens on: ``APP_HOST`` as given, else every interface when
        API keys are set and loopback when they are not, so that an open API is reachable from this
        machine alone until keys are set or ``APP_HOST`` asks for more."""
        if self.host is not None:
            return self.host
        keyed = bool(self.api_keys) or self.tenants_file is not None
        return "0.0.0.0" if keyed else "127.0.0.1"  # noqa: S104 - keys guard every interface

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

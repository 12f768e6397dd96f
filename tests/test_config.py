"""Settings as users write them in the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings


def test_api_keys_accept_the_comma_form(monkeypatch):
    monkeypatch.setenv("APP_API_KEYS", "sk_a, sk_b ,,sk_c")
    assert Settings().api_keys == ["sk_a", "sk_b", "sk_c"]


def test_empty_values_mean_unset(monkeypatch):
    monkeypatch.setenv("APP_API_KEYS", "")
    monkeypatch.setenv("APP_DS_MODEL_PATH", "  ")
    settings = Settings()
    assert settings.api_keys == []
    assert settings.ds_model_path is None


def test_bad_values_are_refused_at_start(monkeypatch):
    monkeypatch.setenv("APP_QUEUE_MAX", "0")
    with pytest.raises(ValidationError, match="queue_max"):
        Settings()
    monkeypatch.setenv("APP_QUEUE_MAX", "5")
    monkeypatch.setenv("APP_DS_DTYPE", "int4")
    with pytest.raises(ValidationError, match="ds_dtype"):
        Settings()


def test_blank_optional_numbers_mean_unset(monkeypatch):
    # A chart or compose file renders unset values as "": that must not stop the service.
    monkeypatch.setenv("APP_VLLM_MAX_MODEL_LEN", "")
    monkeypatch.setenv("APP_VLLM_URL", " ")
    settings = Settings()
    assert settings.vllm_max_model_len is None
    assert settings.vllm_url is None


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        (
            {"APP_QUEUE_BACKEND": "redis", "APP_STORAGE_BACKEND": "s3", "APP_S3_BUCKET": "b"},
            "needs APP_REDIS_URL",
        ),
        ({"APP_QUEUE_BACKEND": "redis", "APP_REDIS_URL": "redis://r:6379/0"}, "go together"),
        ({"APP_STORAGE_BACKEND": "s3", "APP_S3_BUCKET": "b"}, "go together"),
        ({"APP_ROLE": "worker"}, "APP_ROLE=worker needs APP_QUEUE_BACKEND=redis"),
        (
            {"APP_QUEUE_BACKEND": "redis", "APP_REDIS_URL": "redis://r:6379/0", "APP_STORAGE_BACKEND": "s3"},
            "needs APP_S3_BUCKET",
        ),
    ],
)
def test_scale_out_settings_that_cannot_work_are_refused_naming_what_to_set(
    monkeypatch, environment, message
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_worker_with_redis_and_a_bucket_is_accepted(monkeypatch):
    for name, value in {
        "APP_ROLE": "worker",
        "APP_QUEUE_BACKEND": "redis",
        "APP_REDIS_URL": "redis://r:6379/0",
        "APP_STORAGE_BACKEND": "s3",
        "APP_S3_BUCKET": "dsocr",
    }.items():
        monkeypatch.setenv(name, value)
    assert Settings().role == "worker"

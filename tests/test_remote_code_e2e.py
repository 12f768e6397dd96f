"""DeepSeek-OCR v1 (remote code) through the whole service, against a stand-in checkpoint.

The real v1 needs CUDA and transformers < 4.48; the stand-in has the published ``infer()``
signature and records what reached it, so the adapter's call contract is checked end to end.
"""

from __future__ import annotations

import json

import httpx
import pytest

from app.config import Settings
from app.engines.remote_code import RemoteCodeEngine
from app.main import create_app
from tests.documents import png_bytes
from tests.servers import ThreadedServer
from tests.test_api_e2e import finished, upload
from tests.tiny_model import write_remote_code_standin


@pytest.fixture
def standin_dir(tmp_path):
    return write_remote_code_standin(tmp_path / "deepseek-ocr-v1-standin")


def test_v1_adapter_passes_prompt_sizes_and_eval_mode_and_its_text_reaches_full_md(standin_dir, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", ds_dtype="float32", force_cpu=True)

    def factory():
        engine = RemoteCodeEngine(
            str(standin_dir), device="cpu", dtype="float32", use_flash_attn=False, requires_cuda=False
        )
        return engine, "the v1 stand-in"

    with (
        ThreadedServer(create_app(settings, engine_factory=factory)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        default = finished(client, upload(client, png_bytes((320, 200)), "scan.png").json()["task_id"])
        large = finished(
            client, upload(client, png_bytes((320, 200)), "scan.png", resolution="large").json()["task_id"]
        )
        free = finished(
            client, upload(client, png_bytes((320, 200)), "scan.png", mode="free").json()["task_id"]
        )
        markdown = client.get(default["links"]["markdown"]).text
        large_markdown = client.get(large["links"]["markdown"]).text
        layout = client.get(default["links"]["layout"]).json()

    assert markdown == "standin 320x200 base=1024 image=640 crop=True\n"
    assert large_markdown == "standin 320x200 base=1280 image=1280 crop=False\n"
    assert layout["pages"][0]["blocks"][0]["bbox_norm"] == [10, 10, 500, 60]
    assert free["status"] == "succeeded"
    calls = [json.loads(line) for line in (standin_dir / "calls.jsonl").read_text().splitlines()]
    assert [call["prompt"] for call in calls] == [
        "<image>\n<|grounding|>Convert the document to markdown.",
        "<image>\n<|grounding|>Convert the document to markdown.",
        "<image>\nFree OCR.",
    ]
    assert all(call["eval_mode"] is True for call in calls)
    assert all(call["image_size_px"] == [320, 200] for call in calls)
    assert (calls[0]["base_size"], calls[0]["image_size"], calls[0]["crop_mode"]) == (1024, 640, True)
    assert (calls[1]["base_size"], calls[1]["image_size"], calls[1]["crop_mode"]) == (1280, 1280, False)


def test_v1_checkpoint_on_cpu_fails_the_task_saying_what_to_use(make_server, standin_dir):
    server = make_server(default_engine=True, ds_model_path=str(standin_dir))
    view = upload(server.client, png_bytes(), "scan.png").json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "model_unavailable"
    message = done["error"]["message"]
    assert "CUDA" in message
    assert "DeepSeek-OCR-2" in message

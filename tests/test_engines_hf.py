"""The transformers engines, run for real: the tiny DeepSeek-OCR-2 and a v1 remote-code stand-in."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from app.engines.base import END_MARKER, OCREngine, PageText, RecognizeOptions
from app.engines.factory import build_engine
from app.engines.hf import HFEngine
from app.engines.remote_code import RemoteCodeEngine
from app.engines.resolve import ModelChoice, ModelFamily
from app.engines.torch_support import pick_device, torch_dtype
from app.errors import EngineError, ModelUnavailable
from tests.tiny_model import ScriptedAnswers, write_remote_code_standin

DOCUMENT = "<|grounding|>Convert the document to markdown."
ANSWERS = [
    "<|ref|>title<|/ref|><|det|>[[10, 20, 300, 40]]<|/det|>\n# Hello",
    "<|ref|>text<|/ref|><|det|>[[50, 60, 900, 200]]<|/det|>\nSome text, a table",
    "<|ref|>table<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n<table><tr><td>a</td><td>b</td></tr></table>",
]


DEFAULTS = RecognizeOptions(
    prompt=DOCUMENT, base_size=1024, image_size=640, crop_mode=True, max_new_tokens=256, timeout_seconds=60.0
)


def options(**changes: Any) -> RecognizeOptions:
    return dataclasses.replace(DEFAULTS, **changes)


def page(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "white")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def scripted_engine(
    model_dir: Path, answers: list[str], tokenizer: PreTrainedTokenizerBase, **kw: Any
) -> HFEngine:
    """An engine on the tiny model whose generate() says ``answers``, page after page."""
    script = ScriptedAnswers(answers, tokenizer)  # one instance: the answer count runs across calls
    settings: dict[str, Any] = {
        "device": "cpu",
        "dtype": "float32",
        "use_flash_attn": True,  # asked for, but not on CPU: the engine must fall back to sdpa
        "batch_size": 4,
        "no_repeat_ngram_size": 20,
    }
    settings.update(kw)
    return HFEngine(str(model_dir), logits_processors=lambda: [script], **settings)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[HFEngine]:
    engine = scripted_engine(tiny_model_dir, ANSWERS, tokenizer)
    engine.load()
    yield engine
    engine.unload()


def load_and_watch(engine: OCREngine, model_class: str) -> weakref.ref[Any]:
    """Load ``engine``; a weak reference to the one ``model_class`` object the load created."""

    def live() -> list[object]:
        # type(), not isinstance(): some objects in the heap warn when asked for their __class__.
        return [obj for obj in gc.get_objects() if type(obj).__name__ == model_class]

    before = live()  # held strongly, so no new object can reuse their ids
    engine.load()
    [model] = [obj for obj in live() if not any(obj is old for old in before)]
    return weakref.ref(model)


def finished(answer: str, tokenizer: PreTrainedTokenizerBase, prompt_tokens: int = 266) -> PageText:
    """A finished page; ``prompt_tokens``: 257 image tokens for a page without tiles, and 9 of
    text (bos, the newline after the image and the instruction), padding not counted."""
    tokens = len(tokenizer.encode(answer, add_special_tokens=False)) + 1  # + eos
    return PageText(text=answer + END_MARKER, stop_reason="eos", tokens=tokens, prompt_tokens=prompt_tokens)


def test_load_recognize_unload_reload_releases_the_model(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = scripted_engine(tiny_model_dir, ANSWERS, tokenizer)
    model = load_and_watch(engine, "DeepseekOcr2ForConditionalGeneration")
    engine.load()  # idempotent: no second copy
    assert engine.recognize([page(600, 400)], options()) == [finished(ANSWERS[0], tokenizer)]

    engine.unload()
    engine.unload()  # idempotent
    gc.collect()
    assert model() is None, "unload() left a reference to the model"
    with pytest.raises(EngineError, match="not loaded"):
        engine.recognize([page(600, 400)], options())

    engine.load()
    assert engine.recognize([page(600, 400)], options()) == [finished(ANSWERS[1], tokenizer)]
    engine.unload()


def test_batch_of_pages_of_different_sizes_comes_back_in_order(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    # 2000x1500 is cut into tiles (a longer prompt: 1121 image tokens against 257), so the rows
    # are left-padded to different lengths and must still map back to their own pages.
    engine = scripted_engine(tiny_model_dir, ANSWERS, tokenizer)
    engine.load()
    result = engine.recognize([page(600, 400), page(2000, 1500), page(800, 1100)], options())
    engine.unload()
    # Each row's own prompt, without the padding before it: the two larger pages are tiled alike.
    prompts = [266, 1121 + 9, 1121 + 9]
    assert result == [finished(a, tokenizer, n) for a, n in zip(ANSWERS, prompts, strict=True)]


def test_token_cap_stops_a_page_without_the_end_marker(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    long_answer = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n" + "Some text, a table " * 20
    engine = scripted_engine(tiny_model_dir, [long_answer], tokenizer, no_repeat_ngram_size=0)
    engine.load()
    [result] = engine.recognize([page(600, 400)], options(max_new_tokens=6))
    engine.unload()
    assert result.stop_reason == "max_tokens"
    assert not result.finished
    assert result.tokens == 6
    assert END_MARKER not in result.text
    assert long_answer.startswith(result.text)
    assert result.text.startswith("<|ref|>text<|/ref|>")


def test_time_cap_stops_a_page_as_timeout(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    long_answer = "Some text, a table " * 50
    engine = scripted_engine(tiny_model_dir, [long_answer], tokenizer)
    engine.load()
    [result] = engine.recognize([page(600, 400)], options(timeout_seconds=0.001))
    engine.unload()
    assert result.stop_reason == "timeout"
    assert 0 < result.tokens < 256
    assert long_answer.startswith(result.text)


def test_without_tiles_a_large_page_is_read_at_the_tile_size(engine: HFEngine) -> None:
    # With crop_mode off the processor must be told the global view is 768 px, else generate()
    # fails with "Image features and image tokens do not match".
    result = engine.recognize([page(2000, 1500), page(600, 400)], options(crop_mode=False))
    assert [p.stop_reason for p in result] == ["eos", "eos"]
    assert all(p.text.endswith(END_MARKER) for p in result)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loads_in_the_asked_dtype_on_cpu(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, dtype: str
) -> None:
    engine = scripted_engine(tiny_model_dir, ANSWERS, tokenizer, dtype=dtype)
    model = load_and_watch(engine, "DeepseekOcr2ForConditionalGeneration")()
    assert model is not None
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    del model
    assert engine.recognize([page(600, 400)], options()) == [finished(ANSWERS[0], tokenizer)]
    engine.unload()


def test_a_missing_checkpoint_is_unavailable_quickly(tmp_path: Path) -> None:
    engine = HFEngine(
        str(tmp_path / "no-such-model"),
        device="cpu",
        dtype="float32",
        use_flash_attn=False,
        batch_size=1,
        no_repeat_ngram_size=0,
    )
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="no-such-model"):
        engine.load()
    assert time.monotonic() - started < 2


def test_more_pages_than_the_batch_size_are_refused(engine: HFEngine) -> None:
    with pytest.raises(EngineError, match="at most 4"):
        engine.recognize([page(100, 100)] * 5, options())
    assert engine.recognize([], options()) == []


def test_build_engine_picks_the_adapter_of_the_family(tiny_model_dir: Path) -> None:
    common: dict[str, Any] = {
        "device": "cpu",
        "dtype": "bfloat16",
        "use_flash_attn": False,
        "batch_size": 3,
        "no_repeat_ngram_size": 20,
    }
    native = build_engine(ModelChoice(str(tiny_model_dir), ModelFamily.OCR2_NATIVE, "test"), **common)
    remote = build_engine(ModelChoice("somewhere", ModelFamily.REMOTE_CODE, "test"), **common)
    assert isinstance(native, HFEngine)
    assert native.max_batch_size == 3
    assert isinstance(remote, RemoteCodeEngine)
    assert remote.max_batch_size == 1


def test_pick_device() -> None:
    assert pick_device(force_cpu=True) == "cpu"
    assert pick_device(force_cpu=False) == ("cuda" if torch.cuda.is_available() else "cpu")


# --- DeepSeek-OCR v1 through its remote code (a stand-in with the published infer()) ---


def test_remote_code_refuses_a_cpu_device(tmp_path: Path) -> None:
    standin_dir = write_remote_code_standin(tmp_path)
    engine = RemoteCodeEngine(str(standin_dir), device="cpu", dtype="bfloat16", use_flash_attn=True)
    with pytest.raises(ModelUnavailable, match=r"runs only on CUDA.*DeepSeek-OCR-2.*APP_BACKEND=vllm"):
        engine.load()


def test_remote_code_infer_gets_the_page_and_options_and_its_text_comes_back(tmp_path: Path) -> None:
    standin_dir = write_remote_code_standin(tmp_path)
    engine = RemoteCodeEngine(
        str(standin_dir), device="cpu", dtype="bfloat16", use_flash_attn=True, requires_cuda=False
    )
    model = load_and_watch(engine, "DeepseekOCRForCausalLM")
    [result] = engine.recognize(
        [page(640, 480)], options(base_size=1280, image_size=640, crop_mode=False, timeout_seconds=42.0)
    )
    # The published infer() returns the text without the end marker, and no token count.
    assert result == PageText(
        text="<|ref|>text<|/ref|><|det|>[[10, 10, 500, 60]]<|/det|>\n"
        "standin 640x480 base=1280 image=640 crop=False",
        stop_reason="eos",
        tokens=0,
    )
    [call] = [json.loads(line) for line in (standin_dir / "calls.jsonl").read_text().splitlines()]
    assert call == {
        "prompt": "<image>\n<|grounding|>Convert the document to markdown.",
        "image_size_px": [640, 480],
        "base_size": 1280,
        "image_size": 640,
        "crop_mode": False,
        "eval_mode": True,
        "save_results": False,
        "test_compress": False,
        "max_time": 42.0,  # the time cap reaches infer()'s generate() through the generation config
        "dtype": "torch.bfloat16",
    }
    with pytest.raises(EngineError, match="at most 1"):
        engine.recognize([page(10, 10), page(10, 10)], options())
    engine.unload()
    gc.collect()
    assert model() is None, "unload() left a reference to the model"
    with pytest.raises(EngineError, match="not loaded"):
        engine.recognize([page(10, 10)], options())


def test_remote_code_written_for_old_transformers_is_unavailable(tmp_path: Path) -> None:
    legacy = write_remote_code_standin(tmp_path / "legacy", legacy_import=True)
    engine = RemoteCodeEngine(
        str(legacy), device="cpu", dtype="bfloat16", use_flash_attn=False, requires_cuda=False
    )
    with pytest.raises(ModelUnavailable, match=r"needs transformers < 4\.48 \(found 5\.") as caught:
        engine.load()
    assert "LlamaFlashAttention2" in caught.value.message


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert torch_dtype("auto", "cuda") is torch.bfloat16
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("bfloat16", "cpu") is torch.bfloat16

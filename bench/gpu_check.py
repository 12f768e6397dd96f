"""GPU check: what only a machine with an NVIDIA GPU can show, as one table, in under five minutes.

1. ``hf``: the service itself (``create_app``, real uvicorn on loopback) runs the tiny random
   DeepSeek-OCR-2 (``tests/tiny_model.py``) on CUDA with ``APP_DS_DTYPE=auto`` (bfloat16 there),
   the real NVML probe behind the GPU gate and a short ``APP_MODEL_IDLE_SECONDS``. A scripted logits
   processor (the tests' ``ScriptedAnswers``) makes the random model say known grounded text, so
   ``result.md`` is checked page by page. Reported: where the weights went and in which dtype,
   NVML free memory before load, after load, after the pages and after the idle unload, pages/s,
   the NVML gauge in ``/metrics``, and a second instance whose ``APP_GPU_MIN_FREE_MB`` is above the
   card's memory, so its task must wait at the gate and say why.
2. ``vllm``: where vLLM is installed (the GPU machine reaches no network, so nothing is installed
   here), a real ``vllm serve`` of the tiny checkpoint behind the service (``APP_BACKEND=vllm``,
   ``APP_VLLM_URL`` through a recording proxy) with 16 pages in flight: pages/s, errors, and the
   ``max_tokens`` the service sent against the server's ``max_model_len``. vLLM knows DeepSeek-OCR-2
   only as ``DeepseekOCR2ForCausalLM``, the Hub checkpoint's own layout with its encoder sizes fixed
   in code (vllm/model_executor/models/deepseek_ocr2.py, registry.py); the tiny checkpoint is
   transformers' ``DeepseekOcr2ForConditionalGeneration``, so vLLM falls back to its Transformers
   backend, which counts image tokens with the processor's ``_get_num_multimodal_tokens``
   (vllm/model_executor/models/transformers/multimodal.py). Where that cannot work the row says so
   with the reason, and is skipped rather than failed.

Each step runs in its own process under a time limit (all within ``--budget``); a failure is a row
with its reason, the step's output is in ``--log-dir``. The script itself needs only the standard
library, so it reports what it found (Python, torch, CUDA, the device, NVML, missing packages)
wherever it runs. Run it with the Python that has CUDA torch.

Exit status: 0 every check that ran passed; 1 a check failed; 2 no CUDA device (no GPU check ran).

    python bench/gpu_check.py                              # both steps
    python bench/gpu_check.py --skip-vllm --pages 16
    python bench/gpu_check.py --log-dir "$OUT"             # keep the steps' logs there
    python bench/gpu_check.py --vllm-url http://127.0.0.1:8000   # a server started elsewhere
    python bench/gpu_check.py --cpu --skip-vllm            # rehearse the hf step without a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

# `python bench/gpu_check.py` puts bench/ on the path, not the checkout: app/ and tests/ come from here.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built here; nothing is downloaded
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

if TYPE_CHECKING:
    from PIL import Image

    from app.engines.base import PageText, RecognizeOptions
    from app.engines.hf import HFEngine

KEY = "sk_gpu_check"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIB = 1024 * 1024
PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skipped", "info"
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
TERMINAL = ("succeeded", "failed", "canceled")
ENV_SECONDS = 120  # importing torch and the service, and starting CUDA once
HF_SECONDS = 180
MIN_STEP_SECONDS = 30  # a step with less time left is skipped rather than started
# What a process keeps on the GPU after the model is gone: torch's cuBLAS/cuDNN workspaces, held per
# handle and not returned by empty_cache. More than this after an unload means something kept tensors.
KEPT_AFTER_UNLOAD_MIB = 64
# The top-level modules the service and this script import (requirements.txt), checked one by one so
# that every missing package is named at once.
SERVICE_MODULES = (
    "fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn", "python_multipart", "anyio",
    "httpx", "pymupdf", "PIL", "sse_starlette", "prometheus_client", "boto3", "botocore", "zipstream",
    "nh3", "latex2mathml", "markdown_it", "mdit_py_plugins", "pynvml", "tokenizers", "safetensors",
    "transformers",
)  # fmt: skip


# --- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # PASS, FAIL, SKIP or INFO
    value: str
    detail: str = ""


class StepOutput:
    """A step's rows and facts, one JSON line each, written as they are known: a step killed at its
    time limit still leaves everything it measured before."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def row(self, check: str, status: str, value: str, detail: str = "") -> None:
        self._write({"row": asdict(Row(check, status, value, detail))})

    def fact(self, **facts: Any) -> None:
        self._write({"fact": facts})

    def _write(self, record: dict[str, Any]) -> None:
        with self._path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def read_output(path: Path) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    facts: dict[str, Any] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "row" in record:
                rows.append(Row(**record["row"]))
            else:
                facts.update(record["fact"])
    return rows, facts


def table(rows: Sequence[Row]) -> str:
    def cell(text: str) -> str:
        return " ".join(text.replace("|", "/").split())

    lines = ["| check | result | value | detail |", "|---|---|---|---|"]
    lines += [f"| {cell(r.check)} | {r.status} | {cell(r.value)} | {cell(r.detail)} |" for r in rows]
    return "\n".join(lines)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def last_error_line(log: Path) -> str:
    """The line of a log most likely to say what went wrong: the last that names an error."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "error:" in line:
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


# --- the orchestrator ---------------------------------------------------------------------------


def run_child(
    name: str, args: argparse.Namespace, scratch: Path, log_dir: Path, timeout: float
) -> tuple[list[Row], dict[str, Any]]:
    """Run step ``name`` in its own process under ``timeout`` seconds: its rows and facts, plus a FAIL
    row when it was killed for overrunning (with everything it started) or exited abnormally."""
    output = scratch / f"{name}.jsonl"
    log = log_dir / f"{name}.log"
    # The same options (the step reads those it needs), then the step's own.
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--step", name]
    command += ["--rows", str(output), "--step-seconds", f"{timeout:.0f}", "--log-dir", str(log_dir)]
    with log.open("wb") as sink:
        # Its own process group: a timeout kills the step and whatever it started, and nothing else.
        process = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    rows, facts = read_output(output)
    # A server the step started in a session of its own (vllm serve) goes when the step goes.
    if isinstance(facts.get("server_pgid"), int):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(facts["server_pgid"], signal.SIGKILL)
    if code is None:
        rows.append(Row(f"{name}: step", FAIL, f"killed after {timeout:.0f} s", last_error_line(log)))
    elif code != 0:
        rows.append(Row(f"{name}: step", FAIL, f"exit {code}", last_error_line(log)))
    return rows, facts


def vllm_missing(facts: dict[str, Any]) -> str | None:
    return None if facts.get("vllm") else "vllm not installed"


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.budget
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="dsocr-gpu-check-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return deadline - time.monotonic() - 5  # time to print the table

    with tempfile.TemporaryDirectory(prefix="dsocr-gpu-check-") as tmp:
        scratch = Path(tmp)
        rows, facts = run_child("env", args, scratch, log_dir, min(ENV_SECONDS, left()))
        gpu = bool(facts.get("cuda"))
        no_gpu = not gpu and not args.cpu
        not_ready = (
            None if facts.get("service") else "the environment above lacks torch or the service's packages"
        )

        def step(name: str, skip: str | None, limit: float) -> None:
            if skip is None and left() < MIN_STEP_SECONDS:
                rows.append(Row(name, FAIL, "not run: out of time", f"--budget {args.budget:.0f} s"))
                return
            if skip is not None:
                rows.append(Row(name, SKIP, skip))
                return
            rows.extend(run_child(name, args, scratch, log_dir, min(limit, left()))[0])

        if args.skip_hf:
            step("hf", "--skip-hf", 0)
        else:
            step("hf", "no CUDA device" if no_gpu else not_ready, HF_SECONDS)
        if args.skip_vllm:
            step("vllm", "--skip-vllm", 0)
        elif args.vllm_url:  # a server started elsewhere: no vLLM needed here, nor a GPU
            step("vllm", not_ready, args.budget)
        else:
            step("vllm", "no CUDA device" if no_gpu else not_ready or vllm_missing(facts), args.budget)

    elapsed = time.monotonic() - started
    device = facts.get("device") or ("CPU rehearsal" if args.cpu else "no CUDA device")
    print(f"\nGPU check on {device}, torch {facts.get('torch') or 'missing'}, {elapsed:.0f} s\n")
    print(table(rows))
    (log_dir / "gpu-check.md").write_text(table(rows) + "\n", encoding="utf-8")
    if any(row.status == FAIL for row in rows):
        code, why = EXIT_FAILED, "a check failed"
    elif no_gpu:
        code, why = EXIT_NO_GPU, "no CUDA device: nothing GPU-specific ran"
    else:
        code, why = EXIT_OK, "every check that ran passed"
    if code == EXIT_FAILED or args.log_dir:
        print(f"\nexit {code}: {why} (logs: {log_dir})")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)  # nothing to look into
        print(f"\nexit {code}: {why}")
    return code


# --- step: environment --------------------------------------------------------------------------


def step_env(args: argparse.Namespace, out: StepOutput) -> None:
    out.row("env: python", INFO, platform.python_version(), sys.executable)
    try:
        import torch
    except Exception as exc:
        out.row("env: torch", FAIL, "not importable", describe(exc))
        return
    cuda = torch.cuda.is_available()
    detail = f"CUDA build {torch.version.cuda or 'none'}; CUDA available: {'yes' if cuda else 'no'}"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 1024**3:.0f} GiB)"
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        detail += f"; device 0: {device}; bfloat16: {bf16}; CUDA_VISIBLE_DEVICES={_visible()}"
        out.fact(device=device)
    out.row("env: torch", INFO, torch.__version__, detail)
    out.fact(torch=torch.__version__, cuda=cuda)
    _env_nvml(out, cuda)
    try:
        import transformers

        native = hasattr(transformers, "DeepseekOcr2ForConditionalGeneration")
        out.row(
            "env: transformers",
            PASS if native else FAIL,
            transformers.__version__,
            "has DeepSeek-OCR-2's native classes" if native else "no DeepSeek-OCR-2 classes: needs >= 5.11",
        )
    except Exception as exc:
        out.row("env: transformers", FAIL, "not importable", describe(exc))
    missing = [name for name in SERVICE_MODULES if importlib.util.find_spec(name) is None]
    if not missing:  # then anything else the service imports that the list above does not name
        for module in ("app.main", "app.engines.hf", "tests.tiny_model", "tests.documents", "tests.servers"):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                missing.append(exc.name or str(exc))
                break
            except Exception as exc:
                out.row("env: service imports", FAIL, f"import {module} failed", describe(exc))
                return
    if missing:
        out.row("env: service imports", FAIL, "missing: " + ", ".join(missing), "carry them as wheels")
    else:
        out.row("env: service imports", PASS, "app and tests import")
        out.fact(service=True)
    found = importlib.util.find_spec("vllm") is not None
    cli = shutil.which("vllm")
    if found or cli:
        importable = "importable" if found else "not importable"
        out.row("env: vllm", INFO, _version("vllm") or importable, f"{importable}; on PATH: {cli or 'no'}")
        out.fact(vllm=True)
    else:
        out.row("env: vllm", INFO, "not installed", "neither importable nor on PATH")


def _env_nvml(out: StepOutput, cuda: bool) -> None:
    status = FAIL if cuda else INFO  # a GPU the gate cannot see would leave the gate open
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:
        out.row("env: NVML", status, "unavailable", describe(exc))
        return
    from app.engines.gpu import NvmlProbe  # the service's own probe, as its gate and metrics use it

    memory = NvmlProbe().memory()
    if memory is None:
        out.row("env: NVML", status, f"driver {driver}", "the service's NvmlProbe reads nothing")
        return
    free = f"GPU {memory.index}: {mib(memory.free_bytes)} free of {mib(memory.total_bytes)}"
    out.row("env: NVML", PASS, f"driver {driver}", f"{free} (the service's NvmlProbe)")


def _visible() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


# --- step: hf -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """GPU memory at one moment: NVML for the whole card, torch's allocator for this process."""

    nvml_free: int | None  # bytes; None without NVML
    nvml_total: int | None
    reserved: int  # bytes torch's caching allocator holds from the driver
    peak_reserved: int


def read_memory(probe: Any) -> Memory:
    import torch

    nvml = probe.memory()
    started = torch.cuda.is_available() and torch.cuda.is_initialized()  # reading must not start CUDA
    return Memory(
        nvml.free_bytes if nvml else None,
        nvml.total_bytes if nvml else None,
        torch.cuda.memory_reserved() if started else 0,
        torch.cuda.max_memory_reserved() if started else 0,
    )


@dataclass
class MeasuredEngine:
    """The service's ``HFEngine`` (an ``OCREngine``), read at its edges: memory right after ``load``,
    each batch and ``unload``, where the weights went, and the time spent recognising."""

    inner: HFEngine
    read: Callable[[], Memory]
    model_name: str = ""
    max_batch_size: int = 1
    placement: str | None = None  # "device dtype" of the weights, as loaded
    load_seconds: float = 0.0
    after_load: Memory | None = None
    after_pages: Memory | None = None
    after_unload: Memory | None = None
    batches: list[tuple[int, float]] = field(default_factory=list)  # (pages, seconds) per call
    _model: weakref.ref[Any] | None = None

    def __post_init__(self) -> None:
        self.model_name = self.inner.model_name
        self.max_batch_size = self.inner.max_batch_size

    def load(self) -> None:
        started = time.perf_counter()
        self.inner.load()
        self.load_seconds = time.perf_counter() - started
        model = self.inner._model
        weights = next(model.parameters())
        attention = getattr(model.config, "_attn_implementation", "?")
        self.placement = f"{weights.device} {str(weights.dtype).removeprefix('torch.')} ({attention})"
        self._model = weakref.ref(model)
        self.after_load = self.read()

    def unload(self) -> None:
        self.inner.unload()
        self.after_unload = self.read()

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        started = time.perf_counter()
        pages = self.inner.recognize(images, options)  # returns decoded text: the GPU work is done
        self.batches.append((len(images), time.perf_counter() - started))
        self.after_pages = self.read()
        return pages

    def released(self) -> bool:
        """Whether the model object is gone (nothing in the process references it any more)."""
        return self._model is None or self._model() is None


def scripted_page(number: int) -> str:
    """What the model is made to say for the ``number``-th page it sees (0 is the warm-up page)."""
    return (
        f"<|ref|>title<|/ref|><|det|>[[80, 40, 920, 90]]<|/det|>\n# GPU check page {number}\n\n"
        f"<|ref|>text<|/ref|><|det|>[[80, 100, 920, 140]]<|/det|>\nScripted text of page {number}."
    )


def submit(client: Any, pdf: bytes) -> str:
    response = client.post("/v1/tasks/upload", files={"file": ("gpu-check.pdf", pdf)})
    if response.status_code != 202:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["task_id"])


def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def wait_ended(client: Any, task_id: str, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
        return view if view["status"] in TERMINAL else None

    result: dict[str, Any] = wait_until(ended, timeout, f"task {task_id} did not end")
    return result


def step_hf(args: argparse.Namespace, out: StepOutput, seconds: float) -> None:
    # Imported here: the orchestrator runs where these are missing, and says so.
    import httpx
    from transformers import AutoTokenizer

    from app.config import Settings
    from app.engines.gpu import NvmlProbe
    from app.engines.hf import HFEngine
    from app.engines.resolve import resolve_model
    from app.engines.torch_support import pick_device
    from app.main import create_app
    from tests.documents import make_pdf
    from tests.servers import ThreadedServer
    from tests.standins import StandInGpu
    from tests.tiny_model import ScriptedAnswers, build_tiny_ocr2

    deadline = time.monotonic() + seconds - 5
    work = Path(tempfile.mkdtemp(prefix="dsocr-gpu-check-hf-"))
    atexit_remove(work)
    model_dir = build_tiny_ocr2(work / "tiny-ocr2")
    probe = NvmlProbe()
    before = read_memory(probe)  # no CUDA context in this process yet
    script = ScriptedAnswers(
        [scripted_page(n) for n in range(args.pages + 1)], AutoTokenizer.from_pretrained(model_dir)
    )
    values: dict[str, Any] = {
        "api_keys": KEY,
        "link_secret": "gpu-check-link-secret",
        "ds_model_path": str(model_dir),
        "ds_max_new_tokens": args.max_tokens,
        "ds_batch_size": args.batch_size,
        "model_idle_seconds": args.idle_seconds,
        "gpu_poll_seconds": 0.2,
        "force_cpu": args.cpu,
    }
    settings = Settings(data_dir=work / "data", **values)
    engines: list[MeasuredEngine] = []

    def factory() -> tuple[MeasuredEngine, str]:
        # app.engines.factory's hf branch, plus the hook that makes the random model say the script.
        device = pick_device(settings.force_cpu)
        choice = resolve_model(
            settings.ds_model_path,
            cuda_available=device == "cuda",
            download_timeout=settings.hf_download_timeout_seconds,
        )
        inner = HFEngine(
            choice.path,
            device=device,
            dtype=settings.ds_dtype,
            use_flash_attn=settings.ds_use_flash_attn,
            batch_size=settings.ds_batch_size,
            no_repeat_ngram_size=settings.ds_no_repeat_ngram_size,
            logits_processors=lambda: [script],
        )
        engines.append(MeasuredEngine(inner, lambda: read_memory(probe)))
        return engines[-1], f"{choice.reason} (device: {device})"

    app = create_app(settings, engine_factory=factory)  # no gpu_probe: the service's own NvmlProbe
    with ThreadedServer(app) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        warm = wait_ended(client, submit(client, make_pdf(1, picture_page=None)), deadline - time.monotonic())
        if warm["status"] != "succeeded" or not engines:
            out.row("hf: first task (loads the model)", FAIL, warm["status"], json.dumps(warm.get("error")))
            return
        engine = engines[0]
        expected = "cpu float32" if args.cpu else "cuda:0 bfloat16"
        placed = engine.placement or "?"
        out.row(
            "hf: weights on",
            PASS if placed.startswith(expected) else FAIL,
            placed,
            f"APP_DS_DTYPE=auto, expected {expected}; loaded in {engine.load_seconds:.1f} s"
            + (" (CPU rehearsal)" if args.cpu else ""),
        )
        warm_batches = len(engine.batches)
        task_id = submit(client, make_pdf(args.pages, picture_page=None))
        done = wait_ended(client, task_id, deadline - time.monotonic())
        _pages_row(args, out, client, done, engine.batches[warm_batches:])
        _memory_rows(out, before, engine)
        last_page = time.monotonic()
        try:
            wait_until(
                lambda: not client.get("/readyz").json()["model"]["loaded"],
                min(args.idle_seconds + 30, deadline - time.monotonic()),
                "the model was not unloaded",
            )
        except TimeoutError as exc:
            out.row(
                "hf: idle unload",
                FAIL,
                "still loaded",
                f"{exc} (APP_MODEL_IDLE_SECONDS={args.idle_seconds:g})",
            )
            return
        out.row(
            "hf: idle unload",
            PASS,
            f"after {time.monotonic() - last_page:.1f} s idle",
            f"/readyz model.loaded false; APP_MODEL_IDLE_SECONDS={args.idle_seconds:g}",
        )
        _unload_row(out, before, engine, read_memory(probe))
        _metrics_row(out, client.get("/metrics").text, probe)
    gate_probe = StandInGpu() if args.cpu else None  # on the GPU: the service's NvmlProbe again
    total = (gate_probe.total_bytes if gate_probe else before.nvml_total) or 0
    if not total:
        out.row("hf: NVML gate", FAIL, "no GPU memory reading", "NvmlProbe reads nothing on this machine")
        return
    need_mib = total // MIB + 1024
    gate_app = create_app(
        Settings(data_dir=work / "gate", **{**values, "gpu_min_free_mb": need_mib}), gpu_probe=gate_probe
    )
    # Never stopped: its worker waits at the gate, which opens only when the memory is there, and a
    # shutdown would wait out the 20 s grace for it. Its thread ends with this process.
    gate_server = ThreadedServer(gate_app).__enter__()
    with httpx.Client(base_url=gate_server.url, headers=AUTH, timeout=30) as client:
        gated = submit(client, make_pdf(1, picture_page=None))
        try:
            view = wait_until(
                lambda: (v := client.get(f"/v1/tasks/{gated}").json())["waiting_reason"] and v,
                10,
                "no waiting_reason",
            )
        except TimeoutError as exc:
            out.row("hf: NVML gate", FAIL, "task did not wait", str(exc))
            return
        reason = view["waiting_reason"]
        good = view["status"] == "queued" and reason.startswith("waiting for GPU memory")
        out.row(
            "hf: NVML gate",
            PASS if good else FAIL,
            f"task {view['status']} at APP_GPU_MIN_FREE_MB={need_mib}",
            reason + (" (CPU rehearsal: a stand-in GPU)" if args.cpu else ""),
        )


def _pages_row(
    args: argparse.Namespace,
    out: StepOutput,
    client: Any,
    done: dict[str, Any],
    batches: list[tuple[int, float]],
) -> None:
    check = f"hf: {args.pages} pages through the service"
    if done["status"] != "succeeded":
        out.row(check, FAIL, done["status"], json.dumps(done.get("error")))
        return
    markdown = client.get(f"/v1/tasks/{done['task_id']}/result.md")
    text = markdown.text if markdown.status_code == 200 else ""
    wanted = [f"GPU check page {n}" for n in range(1, args.pages + 1)]
    wanted += [f"Scripted text of page {n}." for n in range(1, args.pages + 1)]
    missing = [w for w in wanted if w not in text]
    leaked = [tag for tag in ("<|ref|>", "<|det|>", "end▁of▁sentence") if tag in text]
    seconds = float(done["duration_seconds"])
    engine_seconds = sum(s for _, s in batches)
    good = not missing and not leaked and not done["truncated_pages"]
    out.row(
        check,
        PASS if good else FAIL,
        f"{args.pages / seconds:.2f} pages/s",
        f"task {seconds:.2f} s; in generate() {engine_seconds:.2f} s over {len(batches)} batches "
        f"({sum(n for n, _ in batches) / engine_seconds:.2f} pages/s); APP_DS_BATCH_SIZE={args.batch_size}, "
        f"APP_DS_MAX_NEW_TOKENS={args.max_tokens}; result.md "
        + (
            "has every page's scripted text, no tags"
            if good
            else f"{markdown.status_code}, missing {missing[:3]}, tags {leaked}, "
            f"truncated {done['truncated_pages']}"
        ),
    )


def _memory_rows(out: StepOutput, before: Memory, engine: MeasuredEngine) -> None:
    if before.nvml_free is None:
        out.row("hf: NVML free memory", SKIP, "no NVML reading", "CPU rehearsal" if engine.placement else "")
        return
    out.row("hf: NVML free before load", INFO, mib(before.nvml_free), f"of {mib(before.nvml_total)}")
    for label, memory in (("after load", engine.after_load), ("after the pages", engine.after_pages)):
        if memory is None or memory.nvml_free is None:
            out.row(f"hf: NVML free {label}", FAIL, "not read")
            continue
        out.row(
            f"hf: NVML free {label}",
            INFO,
            f"{mib(memory.nvml_free)} ({(memory.nvml_free - before.nvml_free) / MIB:+,.0f} MiB)",
            f"torch reserved {mib(memory.reserved)}, peak {mib(memory.peak_reserved)}; "
            "the rest of the drop is this process's CUDA context",
        )


def _unload_row(out: StepOutput, before: Memory, engine: MeasuredEngine, now: Memory) -> None:
    released = engine.released()
    at_unload = engine.after_unload
    if at_unload is None:
        out.row("hf: memory after unload", FAIL, "unload() never ran")
        return
    kept_ok = at_unload.reserved <= KEPT_AFTER_UNLOAD_MIB * MIB
    detail = (
        f"model object released: {'yes' if released else 'NO'}; torch still reserves "
        f"{mib(at_unload.reserved)} (workspaces; at most {KEPT_AFTER_UNLOAD_MIB} MiB expected)"
    )
    if now.nvml_free is None or before.nvml_free is None or engine.after_pages is None:
        value = "no NVML reading"
    else:
        back = (now.nvml_free - (engine.after_pages.nvml_free or 0)) / MIB
        kept = (before.nvml_free - now.nvml_free) / MIB
        value = f"{mib(now.nvml_free)} free, {back:+,.0f} MiB back"
        detail += f"; {kept:,.0f} MiB below before load: the CUDA context, kept while the process lives"
    out.row("hf: memory after unload", PASS if released and kept_ok else FAIL, value, detail)


def _metrics_row(out: StepOutput, metrics: str, probe: Any) -> None:
    memory = probe.memory()
    lines = [line for line in metrics.splitlines() if line.startswith("dsocr_gpu_memory_free_bytes{")]
    if memory is None:
        out.row(
            "hf: /metrics GPU gauge", SKIP if not lines else FAIL, "no NVML reading", f"{len(lines)} gauges"
        )
        return
    if not lines:
        out.row("hf: /metrics GPU gauge", FAIL, "dsocr_gpu_memory_free_bytes missing")
        return
    reported = float(lines[0].rsplit(" ", 1)[1])
    off = abs(reported - memory.free_bytes) / MIB
    out.row(
        "hf: /metrics GPU gauge",
        PASS if off < 512 else FAIL,
        f"{reported / MIB:,.0f} MiB free",
        f"NVML read directly: {mib(memory.free_bytes)}",
    )


# --- step: vllm ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One chat completion that went through the proxy."""

    max_tokens: int | None  # as the service asked; None: left out
    status: int
    prompt_tokens: int | None
    error: str | None


class RecordingProxy:
    """``http://127.0.0.1:<port>`` forwarding to ``upstream``, recording every chat completion (the
    ``max_tokens`` sent, the status and prompt tokens answered) and the most requests at once."""

    def __init__(self, upstream: str) -> None:
        import httpx

        self.exchanges: list[Exchange] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._clients: list[httpx.Client] = []
        local = threading.local()
        proxy = self

        def client() -> httpx.Client:  # one per serving thread: each keeps its own connection
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=upstream, timeout=600)
                with proxy._lock:
                    proxy._clients.append(local.client)
            return local.client

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the service's client expects

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _forward(self, body: bytes | None) -> None:
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")
                }
                chat = self.command == "POST" and self.path.endswith("/chat/completions")
                if chat:
                    with proxy._lock:
                        proxy.in_flight += 1
                        proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    answer = client().request(self.command, self.path, content=body, headers=headers)
                    status, content = answer.status_code, answer.content
                    kind = answer.headers.get("content-type", "application/json")
                except httpx.HTTPError as exc:  # the server went away: what a gateway answers
                    status, content, kind = (
                        502,
                        json.dumps({"message": describe(exc)}).encode(),
                        "application/json",
                    )
                finally:
                    if chat:
                        with proxy._lock:
                            proxy.in_flight -= 1
                if chat and body is not None:
                    proxy._record(body, status, content)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: object) -> None:
                return  # the service's own logs say what was asked

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _record(self, body: bytes, status: int, content: bytes) -> None:
        sent = json.loads(body).get("max_tokens")
        prompt = error = None
        try:
            payload = json.loads(content)
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if status == 200:
            prompt = (payload.get("usage") or {}).get("prompt_tokens")
        else:
            error = str(payload.get("message") or payload.get("error") or content[:300])[:300]
        with self._lock:
            self.exchanges.append(Exchange(sent, status, prompt, error))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for client in self._clients:
            client.close()


class VllmServe:
    """``vllm serve`` of ``model_dir`` on a free loopback port, in a session of its own so that it
    and the engine processes it starts are stopped together."""

    def __init__(self, model_dir: Path, log: Path, args: argparse.Namespace) -> None:
        from tests.servers import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        cli = shutil.which("vllm")
        base = (
            [cli, "serve", str(model_dir)]
            if cli
            else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        )
        self.command = [
            *base,
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--max-model-len", str(args.vllm_max_model_len)),
            *("--max-num-seqs", str(args.vllm_concurrency)),
            *("--gpu-memory-utilization", "0.5"),
            "--enforce-eager",  # no CUDA graph capture: a start in seconds, not minutes
        ]
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> str | None:
        """``None`` once ``/health`` and ``/v1/models`` answer, else why not (exit or timeout)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited {self.process.returncode}: {last_error_line(self.log)}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return None
            time.sleep(0.5)
        return f"not up in {timeout:.0f} s: {last_error_line(self.log)}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def vllm_can_serve(model_dir: Path) -> tuple[bool | None, str]:
    """Whether this vLLM can load the tiny checkpoint, read from its registry before trying:
    ``True``, ``False`` (with the reason), or ``None`` when only trying will tell."""
    archs = json.loads((model_dir / "config.json").read_text())["architectures"]
    try:
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
    except Exception as exc:
        return None, f"vLLM's model registry could not be read ({describe(exc)})"
    known = [arch for arch in archs if arch in supported]
    if known:
        return True, f"{known[0]} is in vLLM's model registry"
    import transformers
    from transformers import DeepseekOcr2Processor

    native = (
        "vLLM has DeepSeek-OCR-2 only as DeepseekOCR2ForCausalLM, the Hub checkpoint's own layout with "
        "its encoder sizes fixed in code"
        if "DeepseekOCR2ForCausalLM" in supported
        else "this vLLM has no DeepSeek-OCR-2 model"
    )
    why = f"{', '.join(archs)} is not in vLLM's registry ({native})"
    if not hasattr(DeepseekOcr2Processor, "_get_num_multimodal_tokens"):
        return False, (
            f"{why}, and vLLM's Transformers backend needs the processor's _get_num_multimodal_tokens, "
            f"which DeepseekOcr2Processor lacks in transformers {transformers.__version__}"
        )
    return None, f"{why}; vLLM's Transformers backend may serve it"


def step_vllm(args: argparse.Namespace, out: StepOutput, seconds: float) -> None:
    import httpx

    from app.config import Settings
    from app.main import create_app
    from tests.documents import make_pdf
    from tests.servers import ThreadedServer
    from tests.tiny_model import build_tiny_ocr2

    deadline = time.monotonic() + seconds - 5
    work = Path(tempfile.mkdtemp(prefix="dsocr-gpu-check-vllm-"))
    atexit_remove(work)
    url = args.vllm_url
    serve: VllmServe | None = None
    with contextlib.ExitStack() as stack:
        if url is None:
            model_dir = build_tiny_ocr2(work / "tiny-ocr2")
            can, why = vllm_can_serve(model_dir)
            serve = VllmServe(model_dir, Path(args.log_dir) / "vllm-serve.log", args)
            out.fact(server_pgid=serve.process.pid)
            stack.callback(serve.stop)
            # Leave a minute for the pages: a vLLM that is not up by then has told us enough.
            started = time.monotonic()
            failed = serve.wait_ready(min(args.vllm_start_timeout, deadline - time.monotonic() - 60))
            check = "vllm: serve the tiny checkpoint"
            if failed is not None:
                if can is False:
                    out.row(check, SKIP, "vLLM cannot load it", f"{why}; vllm serve: {failed}")
                else:
                    out.row(check, FAIL, "did not start", f"{why}; vllm serve: {failed}")
                return
            out.row(
                check,
                PASS,
                f"vLLM {_version('vllm') or '(version unknown)'} up in {time.monotonic() - started:.0f} s",
                f"{why}; {' '.join(serve.command[1:])}",
            )
            url = serve.url
        listed = httpx.get(f"{url}/v1/models", timeout=10).json().get("data") or [{}]
        context = listed[0].get("max_model_len")
        proxy = RecordingProxy(url)
        stack.callback(proxy.close)
        values: dict[str, Any] = {
            "data_dir": work / "data",
            "api_keys": KEY,
            "link_secret": "gpu-check-link-secret",
            "backend": "vllm",
            "vllm_url": proxy.url,
            "vllm_concurrency": args.vllm_concurrency,
            "vllm_retries": 0,  # every refusal shows as an error instead of being retried away
        }
        if args.vllm_max_tokens:
            values["vllm_max_tokens"] = args.vllm_max_tokens
        app = create_app(Settings(**values))
        server = stack.enter_context(ThreadedServer(app))
        client = stack.enter_context(httpx.Client(base_url=server.url, headers=AUTH, timeout=60))
        # Unmeasured: the server's first request (lazy initialisation) and the engine's model discovery.
        warm = wait_ended(client, submit(client, make_pdf(1, picture_page=None)), deadline - time.monotonic())
        warm_requests = len(proxy.exchanges)
        done = wait_ended(
            client, submit(client, make_pdf(args.vllm_pages, picture_page=None)), deadline - time.monotonic()
        )
        measured = proxy.exchanges[warm_requests:]
        errors = [e for e in proxy.exchanges if e.status != 200]
        good = warm["status"] == done["status"] == "succeeded" and not errors
        duration = done.get("duration_seconds") or 0.0
        first_error = f"; first error: {errors[0].status} {errors[0].error}" if errors else ""
        task_error = f" ({done['error']['message']})" if done.get("error") else ""
        out.row(
            f"vllm: {args.vllm_pages} pages, {args.vllm_concurrency} in flight",
            PASS if good else FAIL,
            f"{args.vllm_pages / duration:.2f} pages/s" if good and duration else done["status"],
            f"task {done['status']}{task_error} in {duration:.1f} s; {len(measured)} requests, "
            f"{len(errors)} errors, at most {proxy.max_in_flight} in flight at the server{first_error}",
        )
        _context_row(out, proxy.exchanges, context, client.get("/readyz").json()["model"])


def _context_row(
    out: StepOutput, exchanges: list[Exchange], context: int | None, model: dict[str, Any]
) -> None:
    sent = sorted({e.max_tokens for e in exchanges if e.max_tokens is not None})
    omitted = sum(e.max_tokens is None for e in exchanges)
    prompts = [e.prompt_tokens for e in exchanges if e.prompt_tokens is not None]
    over = [
        e
        for e in exchanges
        if context is not None and e.max_tokens is not None and e.prompt_tokens is not None
        if e.prompt_tokens + e.max_tokens > context
    ]
    refused = [e for e in exchanges if e.status == 400]
    value = f"max_tokens {sent or 'never sent'}" + (f", omitted {omitted}x" if omitted else "")
    value += (
        f" vs max_model_len {context}" if context is not None else "; the server reports no max_model_len"
    )
    detail = f"prompt tokens {min(prompts)}-{max(prompts)}" if prompts else "no prompt token counts"
    detail += f"; over the context: {len(over)}; answered 400: {len(refused)}"
    server = model.get("server") or {}
    detail += f"; /readyz model.server: {server.get('detail', 'none')}"
    out.row("vllm: max_tokens vs context", FAIL if over or refused else PASS, value, detail)


# --- entry point --------------------------------------------------------------------------------


_REMOVE_AT_EXIT: list[Path] = []


def atexit_remove(path: Path) -> None:
    """Remove ``path`` when the step ends (steps leave with ``os._exit``, which runs no atexit hook)."""
    _REMOVE_AT_EXIT.append(path)


STEPS: dict[str, Callable[[argparse.Namespace, StepOutput, float], None]] = {
    "env": lambda args, out, seconds: step_env(args, out),
    "hf": step_hf,
    "vllm": step_vllm,
}


def run_step(args: argparse.Namespace) -> int:
    """One step, in this process: every failure becomes a row; the traceback goes to the log."""
    out = StepOutput(Path(args.rows))
    try:
        STEPS[args.step](args, out, args.step_seconds)
    except Exception as exc:
        traceback.print_exc()
        out.row(f"{args.step}: step", FAIL, "raised", describe(exc))
    for path in _REMOVE_AT_EXIT:
        shutil.rmtree(path, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a service left waiting at the gate (hf) must not hold up the interpreter's exit.
    os._exit(0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=8, help="pages of the measured hf task (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="APP_DS_BATCH_SIZE (default 4)")
    parser.add_argument("--max-tokens", type=int, default=256, help="APP_DS_MAX_NEW_TOKENS (default 256)")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=3,
        help="APP_MODEL_IDLE_SECONDS for the unload check (default 3)",
    )
    parser.add_argument("--skip-hf", action="store_true", help="leave out the hf step")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out the vllm step")
    parser.add_argument(
        "--vllm-url", help="an OpenAI-compatible server to use instead of starting vllm serve"
    )
    parser.add_argument("--vllm-pages", type=int, default=16, help="pages of the vllm task (default 16)")
    parser.add_argument(
        "--vllm-concurrency",
        type=int,
        default=16,
        help="APP_VLLM_CONCURRENCY and --max-num-seqs (default 16)",
    )
    parser.add_argument(
        "--vllm-max-model-len",
        type=int,
        default=2048,
        help="vllm serve --max-model-len (default 2048: below the service's default max_tokens of 8192, "
        "so the clamp to the server's context is what is checked)",
    )
    parser.add_argument(
        "--vllm-max-tokens", type=int, help="APP_VLLM_MAX_TOKENS (default: unset, the service's default)"
    )
    parser.add_argument(
        "--vllm-start-timeout",
        type=float,
        default=180,
        help="seconds vllm serve gets to come up (default 180)",
    )
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole check (default 290)")
    parser.add_argument(
        "--log-dir",
        help="where the steps' logs and the table go (default: a temp dir, kept if a check failed)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="rehearse on a machine without a GPU: the hf step on the CPU in float32, a stand-in GPU at "
        "the gate, no NVML readings; tests this script, proves nothing about GPUs",
    )
    # The orchestrator runs each step as `gpu_check.py <the same options> --step NAME`.
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--step-seconds", type=float, default=60, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    return run_step(args) if args.step else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

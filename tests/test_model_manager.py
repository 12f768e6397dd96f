"""The model manager feeds a batch engine that prepares outside the inference lock (``hf``): calls
generate one at a time, in the order they were made, whichever preparation ends first."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

from PIL import Image

from app.engines.base import END_MARKER, PageText, RecognizeOptions
from app.engines.manager import Engine, ModelManager
from app.metrics import Metrics
from tests.standins import StandInGpu

OPTIONS = RecognizeOptions(
    prompt="<|grounding|>Convert the document to markdown.",
    base_size=1024,
    image_size=768,
    crop_mode=False,
    max_new_tokens=16,
    timeout_seconds=30,
)


class PreparingStandIn:
    """A batch engine split as ``HFEngine`` is: ``prepare`` may run beside a ``generate``, but two
    ``generate`` calls at once fail, as two ``model.generate()`` on one model must never happen.
    ``prepare`` takes as long as the image's width says in milliseconds, so a test picks which
    call's preparation ends first."""

    model_name = "preparing-stand-in"
    max_batch_size = 4

    def __init__(self) -> None:
        self.generated: list[int] = []  # the widths of the images, in the order they were generated
        self._generating = threading.Lock()

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def prepare(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[int]:
        time.sleep(images[0].width / 1000)
        return [image.width for image in images]

    def generate(self, batch: list[int]) -> list[PageText]:
        if not self._generating.acquire(blocking=False):
            raise RuntimeError("two generate() calls at once on one model")
        try:
            time.sleep(0.02)
            self.generated.extend(batch)
            return [PageText(f"page {width}{END_MARKER}", "eos", 3) for width in batch]
        finally:
            self._generating.release()

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        return self.generate(self.prepare(images, options))


def manager_of(engine: PreparingStandIn) -> ModelManager:
    def factory() -> tuple[Engine, str]:
        return engine, "a test"

    return ModelManager(factory, idle_seconds=60, metrics=Metrics(StandInGpu()))


def test_calls_generate_in_the_order_they_were_made_whichever_preparation_ends_first():
    engine = PreparingStandIn()
    models = manager_of(engine)

    async def main() -> list[list[PageText]]:
        await models.limits()  # loaded, as a task's first page loads it
        # The first call prepares longest: the later ones must still wait their turn.
        calls = [models.recognize([Image.new("RGB", (width, 8))], OPTIONS) for width in (300, 10, 120, 5)]
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert engine.generated == [300, 10, 120, 5]
    assert [answer[0].text for answer in answers] == [f"page {w}{END_MARKER}" for w in (300, 10, 120, 5)]


def test_a_call_cancelled_while_it_waits_passes_its_turn_on():
    engine = PreparingStandIn()
    models = manager_of(engine)

    async def main() -> list[PageText]:
        await models.limits()
        first = asyncio.ensure_future(models.recognize([Image.new("RGB", (200, 8))], OPTIONS))
        second = asyncio.ensure_future(models.recognize([Image.new("RGB", (5, 8))], OPTIONS))
        third = asyncio.ensure_future(models.recognize([Image.new("RGB", (7, 8))], OPTIONS))
        await asyncio.sleep(0.05)  # the second is prepared and waits in line behind the first
        second.cancel()
        done = await third
        assert (await first)[0].finished
        assert second.cancelled()
        return done

    assert asyncio.run(main())[0].text == f"page 7{END_MARKER}"
    assert engine.generated == [200, 7]

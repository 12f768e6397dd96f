"""``dsocr eval``'s arithmetic: what a server made of each document, read from its ``result.json``.

Without ground truth, the server's own quality signal is the measure (issue 17): the share of pages
it marked suspect and why, how well the recognised text agrees with the PDF's text layer, and how
many retries the pages took. Figures add up page by page, so the total weighs every page alike
whichever document it came from.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsocr_client._batch import Outcome
from dsocr_client.models import SUSPECT_REASONS, ResultPage, Task

DIGITS = 4  # rounding of shares and agreements in the JSON summary


@dataclass
class QualityTally:
    """Sums over result pages. ``quality_pages`` counts the pages that carry a ``quality`` object:
    shares are of those pages (``None`` when there are none, as from servers older than the
    signal); the agreement is over the pages that have one (PDF pages with a text layer)."""

    pages: int = 0
    quality_pages: int = 0
    suspect_pages: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # pages per reason; a page may have several
    agreement_pages: int = 0
    agreement_sum: float = 0.0
    agreement_worst: float | None = None
    retries: int = 0  # attempts beyond the first, summed

    def add_page(self, page: ResultPage) -> None:
        self.pages += 1
        quality = page.quality
        if quality is None:
            return
        self.quality_pages += 1
        self.suspect_pages += quality.suspect
        self.reasons.update(set(quality.reasons))
        self.retries += max(quality.attempts - 1, 0)
        agreement = quality.text_layer_agreement
        if agreement is not None:
            self.agreement_pages += 1
            self.agreement_sum += agreement
            self.agreement_worst = _lowest(self.agreement_worst, agreement)

    def add(self, other: QualityTally) -> None:
        """Add another document's tally to this one."""
        self.pages += other.pages
        self.quality_pages += other.quality_pages
        self.suspect_pages += other.suspect_pages
        self.reasons.update(other.reasons)
        self.retries += other.retries
        self.agreement_pages += other.agreement_pages
        self.agreement_sum += other.agreement_sum
        self.agreement_worst = _lowest(self.agreement_worst, other.agreement_worst)

    def share(self, pages: int) -> float | None:
        """``pages`` as a share of the pages with a quality object; ``None`` when there are none."""
        return round(pages / self.quality_pages, DIGITS) if self.quality_pages else None

    @property
    def agreement_mean(self) -> float | None:
        return round(self.agreement_sum / self.agreement_pages, DIGITS) if self.agreement_pages else None

    def reason_names(self) -> list[str]:
        """Every known reason, then any other the server gave, in a stable order."""
        return [*SUSPECT_REASONS, *sorted(set(self.reasons) - set(SUSPECT_REASONS))]

    def to_json(self) -> dict[str, Any]:
        worst = self.agreement_worst
        return {
            "pages": self.pages,
            "quality_pages": self.quality_pages,
            "suspect_pages": self.suspect_pages,
            "suspect_share": self.share(self.suspect_pages),
            "reasons": {
                name: {"pages": self.reasons[name], "share": self.share(self.reasons[name])}
                for name in self.reason_names()
            },
            "agreement_pages": self.agreement_pages,
            "agreement_mean": self.agreement_mean,
            "agreement_worst": None if worst is None else round(worst, DIGITS),
            "retries": self.retries,
        }


def _lowest(a: float | None, b: float | None) -> float | None:
    """The lower of two agreements, either of which may be missing."""
    return min((x for x in (a, b) if x is not None), default=None)


def tally_result(result_json: Path) -> QualityTally:
    """The tally of every page of a downloaded ``result.json``; raises ``OSError`` or
    ``ValueError`` (``KeyError`` for a page without its number) when it cannot be read."""
    task = Task.from_json(json.loads(result_json.read_text(encoding="utf-8")))
    tally = QualityTally()
    for page in task.result_pages:
        tally.add_page(page)
    return tally


@dataclass
class Evaluation:
    """One document's run: the batch's outcome and, once it succeeded, its pages' tally."""

    outcome: Outcome
    tally: QualityTally | None = None

    @property
    def pages_per_second(self) -> float | None:
        """Pages over the server's processing time of the task."""
        seconds = self.outcome.seconds
        pages = self.tally.pages if self.tally else 0
        return round(pages / seconds, 3) if pages and seconds else None

    def to_json(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "path": outcome.path,
            "status": outcome.status,
            "task_id": outcome.task_id,
            "error": outcome.error,
            "seconds": outcome.seconds,
            "pages_per_second": self.pages_per_second,
            **(self.tally or QualityTally()).to_json(),
        }


def evaluate(outcomes: list[Outcome]) -> list[Evaluation]:
    """Each outcome with the tally of its ``result.json`` (in ``outcome.output``) where it
    succeeded; a result that cannot be read turns its document into a failure that says why."""
    evaluations = []
    for outcome in outcomes:
        evaluation = Evaluation(outcome)
        if outcome.status == "succeeded":
            try:
                evaluation.tally = tally_result(Path(outcome.output) / "result.json")
            except (OSError, ValueError, KeyError) as exc:
                outcome.status, outcome.error = "failed", f"unreadable result.json: {exc}"
        evaluations.append(evaluation)
    return evaluations


def total(evaluations: list[Evaluation], wall_seconds: float) -> dict[str, Any]:
    """The summary over every document: counts by status, the pages' tally, and pages per second
    of the whole run (wall-clock, with upload and queueing: what a team gets end to end)."""
    tally = QualityTally()
    for evaluation in evaluations:
        if evaluation.tally is not None:
            tally.add(evaluation.tally)
    statuses = Counter(evaluation.outcome.status for evaluation in evaluations)
    return {
        "documents": len(evaluations),
        "succeeded": statuses["succeeded"],
        "failed": len(evaluations) - statuses["succeeded"],
        "seconds": round(wall_seconds, 3),
        "pages_per_second": round(tally.pages / wall_seconds, 3) if tally.pages and wall_seconds else None,
        **tally.to_json(),
    }

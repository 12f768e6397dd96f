"""The ``dsocr`` command: convert or evaluate documents through a dsocr server, run the server,
follow tasks.

Exit codes: 0 when everything succeeded, 1 when something failed, 2 on a usage error, 130 after
Ctrl-C. Progress goes to stderr (bars on a terminal, log lines otherwise), results to stdout.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as ProgressBars
from rich.table import Table

from dsocr_client._batch import Batch, Document, Outcome, UsageError, find_documents
from dsocr_client._client import DEFAULT_FORMATS, FORMAT_FILES, Client, result_names
from dsocr_client._eval import Evaluation, evaluate, total
from dsocr_client.errors import DsocrError
from dsocr_client.models import Progress

cli = typer.Typer(
    help="Convert PDFs and images to Markdown with a dsocr server, or run one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="DSOCR_URL", help="The dsocr server. (default: http://localhost:8000)"),
]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="DSOCR_API_KEY", help="Bearer API key of the server.")
]


class Mode(StrEnum):
    document = "document"
    free = "free"
    figure = "figure"
    describe = "describe"


class Resolution(StrEnum):
    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"
    gundam = "gundam"


ModeOption = Annotated[Mode | None, typer.Option(help="What to ask the model for. (default: document)")]
ResolutionOption = Annotated[
    Resolution | None,
    typer.Option(help="The model's size mode; gundam tiles large pages. (default: the server's)"),
]
PagesOption = Annotated[str | None, typer.Option(help='Pages to convert, 1-based: "1-3,7". (default: all)')]
DpiOption = Annotated[int | None, typer.Option(help="Rendering resolution of PDF pages. (default: 144)")]
JobsOption = Annotated[int, typer.Option("-j", "--jobs", min=1, help="Documents in flight at once.")]


def _task_options(
    mode: Mode | None, resolution: Resolution | None, pages: str | None, dpi: int | None
) -> dict[str, str | int | None]:
    return {
        "mode": mode.value if mode else None,
        "resolution": resolution.value if resolution else None,
        "pages": pages,
        "dpi": dpi,
    }


def _run_batch(batch: Batch, reporter: BarReporter | LogReporter, err: Console, *, detach: bool) -> bool:
    """Run ``batch`` under ``reporter``; on Ctrl-C cancel its tasks in flight (unless ``detach``)
    and return ``True``."""
    try:
        if isinstance(reporter, BarReporter):
            with reporter.bars:
                batch.run()
        else:
            batch.run()
    except KeyboardInterrupt:
        err.print("interrupted: " + ("leaving tasks running" if detach else "canceling tasks in flight"))
        batch.interrupt(cancel=not detach)
        return True
    return False


class BarReporter:
    """A bar per document in flight, moving per page, above an overall bar of documents."""

    def __init__(self, console: Console, total: int) -> None:
        self.bars = ProgressBars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.overall = self.bars.add_task("all documents", total=total)
        self.rows: dict[str, TaskID] = {}

    def started(self, document: Document) -> None:
        self.rows[document.name] = self.bars.add_task(document.name, total=None)

    def progressed(self, document: Document, progress: Progress) -> None:
        self.bars.update(
            self.rows[document.name],
            total=progress.pages_total or None,
            completed=progress.pages_done,
            description=f"{document.name} ({progress.status})",
        )

    def finished(self, document: Document, outcome: Outcome) -> None:
        self.bars.remove_task(self.rows.pop(document.name))  # finished rows would crowd out the live ones
        self.bars.advance(self.overall)
        if outcome.status not in ("succeeded", "skipped"):
            self.bars.console.print(f"[red]{document.name}: {outcome.status}[/] {outcome.error or ''}")


class LogReporter:
    """Plain lines, for logs and pipes: one per status change, page and finished document."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def _line(self, document: Document, text: str) -> None:
        self.console.print(f"{document.name}: {text}", markup=False, highlight=False, soft_wrap=True)

    def started(self, document: Document) -> None:
        self._line(document, f"started {document.path}")

    def progressed(self, document: Document, progress: Progress) -> None:
        if progress.page is None:
            self._line(document, progress.status)
        else:
            self._line(document, f"page {progress.page} done ({progress.pages_done}/{progress.pages_total})")

    def finished(self, document: Document, outcome: Outcome) -> None:
        detail = f" ({outcome.error})" if outcome.error else f", {outcome.pages} pages"
        self._line(document, f"{outcome.status}{detail}")


def _summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="dsocr convert")
    for column in ("document", "status", "pages", "seconds", "pages/s", "error"):
        table.add_column(column, justify="right" if column in ("pages", "seconds", "pages/s") else "left")
    for outcome in outcomes:
        table.add_row(
            Path(outcome.path).name,
            outcome.status,
            str(outcome.pages),
            f"{outcome.seconds:.1f}" if outcome.seconds is not None else "",
            f"{outcome.pages_per_second:.2f}" if outcome.pages_per_second else "",
            outcome.error or "",
        )
    return table


@cli.command()
def convert(
    paths: Annotated[
        list[str], typer.Argument(help="Files, folders (searched recursively for PDFs and images) or globs.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Results go to OUTPUT/<name>/ (full.md, layout.json ...).")
    ] = Path("dsocr-output"),
    url: UrlOption = None,
    api_key: KeyOption = None,
    mode: ModeOption = None,
    resolution: ResolutionOption = None,
    pages: PagesOption = None,
    dpi: DpiOption = None,
    jobs: JobsOption = 2,
    force: Annotated[bool, typer.Option(help="Convert again documents whose results are complete.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary instead of a table.")
    ] = False,
    detach: Annotated[
        bool, typer.Option(help="On Ctrl-C, leave the tasks in flight running on the server.")
    ] = False,
    formats: Annotated[
        str,
        typer.Option(
            "--format",
            help="What to write, comma-separated: md (full.md and images/), json (layout.json), chunks "
            "(chunks.json), html (result.html), docx (result.docx). result.json is always written.",
        ),
    ] = ",".join(DEFAULT_FORMATS),
) -> None:
    """Convert documents; results in OUTPUT/<name>/ in the server's layout. A re-run skips documents
    whose results are complete. Exit 0 when all succeeded, 1 when some failed, 2 on a usage error;
    Ctrl-C cancels the server tasks in flight (unless --detach) and exits 130."""
    chosen = tuple(name.strip() for name in formats.split(",") if name.strip())
    try:
        result_names(chosen, [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--format") from exc
    if not chosen:
        raise typer.BadParameter(f"name at least one of {', '.join(FORMAT_FILES)}", param_hint="--format")
    try:
        documents = find_documents(paths, output)
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATHS") from exc
    err = Console(stderr=True)
    options = _task_options(mode, resolution, pages, dpi)
    with Client(url, api_key) as client:
        reporter = BarReporter(err, len(documents)) if err.is_terminal else LogReporter(err)
        batch = Batch(client, documents, options, reporter, jobs=jobs, force=force, formats=chosen)
        interrupted = _run_batch(batch, reporter, err, detach=detach)
    outcomes = sorted(batch.results(), key=lambda o: o.path)  # every document, whatever happened to it
    ok = all(o.status in ("succeeded", "skipped") for o in outcomes)
    if as_json:
        statuses = ("succeeded", "skipped", "failed", "canceled", "running")
        counts = {s: sum(o.status == s for o in outcomes) for s in statuses}
        summary = {
            "ok": ok,
            "interrupted": interrupted,
            **counts,
            "documents": [o.to_json() for o in outcomes],
        }
        typer.echo(json.dumps(summary, indent=2))
    else:
        Console().print(_summary_table(outcomes))
    raise typer.Exit(130 if interrupted else 0 if ok else 1)


EVAL_HELP = """Run documents through the server and measure what it made of them,
without ground truth: per document and in total, pages, pages/s, the share
of suspect pages by reason, the mean and worst agreement of the text with
the PDF's text layer, and retries (attempts beyond the first). Compare
models, resolutions or servers on your own documents.

\b
--json prints one object:
  {"ok", "interrupted", "documents": [DOC, ...], "total": TOTAL}
DOC: {"path", "status", "task_id", "error", "seconds" (server time),
  "pages_per_second", ...FIGURES}
TOTAL: {"documents", "succeeded", "failed" (did not succeed),
  "seconds" (wall-clock of the run), "pages_per_second", ...FIGURES}
FIGURES: {"pages", "quality_pages" (pages with a quality signal),
  "suspect_pages", "suspect_share", "reasons": {REASON: {"pages",
  "share"}}, "agreement_pages", "agreement_mean", "agreement_worst",
  "retries"}; shares are of quality_pages (0-1), null where nothing
  was measured, as are agreements.

\b
Exit 0 when every document ran, 1 when any failed,
2 on a usage error, 130 after Ctrl-C (which cancels the tasks in flight)."""


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _suspect_cell(figures: dict[str, Any]) -> str:
    share = figures["suspect_share"]
    return "-" if share is None else f"{figures['suspect_pages']} ({share:.0%})"


def _reasons_cell(figures: dict[str, Any]) -> str:
    shares = [f"{name} {entry['share']:.0%}" for name, entry in figures["reasons"].items() if entry["pages"]]
    return ", ".join(shares)


def _eval_table(documents: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    table = Table(title="dsocr eval")
    numeric = ("pages", "pages/s", "suspect", "agreement", "worst", "retries")
    for column in ("document", "status", *numeric[:3], "reasons", *numeric[3:], "error"):
        table.add_column(column, justify="right" if column in numeric else "left")

    def row(name: str, status: str, figures: dict[str, Any], error: str) -> list[str]:
        return [
            name,
            status,
            str(figures["pages"]),
            _number(figures["pages_per_second"], 2),
            _suspect_cell(figures),
            _reasons_cell(figures),
            _number(figures["agreement_mean"]),
            _number(figures["agreement_worst"]),
            str(figures["retries"]),
            error,
        ]

    for index, document in enumerate(documents):
        cells = row(Path(document["path"]).name, document["status"], document, document["error"] or "")
        table.add_row(*cells, end_section=index == len(documents) - 1)
    status = f"{summary['succeeded']}/{summary['documents']} succeeded"
    table.add_row(*row("total", status, summary, ""))
    return table


@cli.command(name="eval", help=EVAL_HELP)
def eval_(
    paths: Annotated[
        list[str], typer.Argument(help="Files, folders (searched recursively for PDFs and images) or globs.")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Keep each document's result.json in OUTPUT/<name>/. (default: discard)"
        ),
    ] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
    mode: ModeOption = None,
    resolution: ResolutionOption = None,
    pages: PagesOption = None,
    dpi: DpiOption = None,
    jobs: JobsOption = 2,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (shape above) instead of a table.")
    ] = False,
) -> None:
    with tempfile.TemporaryDirectory(prefix="dsocr-eval-") as scratch:
        try:
            documents = find_documents(paths, output or Path(scratch))
        except UsageError as exc:
            raise typer.BadParameter(str(exc), param_hint="PATHS") from exc
        err = Console(stderr=True)
        options = _task_options(mode, resolution, pages, dpi)
        started = time.monotonic()
        with Client(url, api_key) as client:
            reporter = BarReporter(err, len(documents)) if err.is_terminal else LogReporter(err)
            # Always run again (force): a result left by an earlier run would measure nothing now.
            # Only result.json is fetched (formats=()): it holds every figure measured here.
            batch = Batch(client, documents, options, reporter, jobs=jobs, force=True, formats=())
            interrupted = _run_batch(batch, reporter, err, detach=False)
        wall_seconds = time.monotonic() - started
        evaluations = evaluate(sorted(batch.results(), key=lambda o: o.path))
    _print_evaluation(evaluations, wall_seconds, interrupted, as_json=as_json, err=err)
    ok = all(evaluation.outcome.status == "succeeded" for evaluation in evaluations)
    raise typer.Exit(130 if interrupted else 0 if ok else 1)


def _print_evaluation(
    evaluations: list[Evaluation], wall_seconds: float, interrupted: bool, *, as_json: bool, err: Console
) -> None:
    documents = [evaluation.to_json() for evaluation in evaluations]
    summary = total(evaluations, wall_seconds)
    if summary["pages"] and not summary["quality_pages"]:
        err.print("note: this server's pages carry no quality signal (it predates it)")
    if as_json:
        ok = summary["succeeded"] == summary["documents"]
        report = {"ok": ok, "interrupted": interrupted, "documents": documents, "total": summary}
        typer.echo(json.dumps(report, indent=2))
        return
    # Wide enough for every column when stdout is a file or a pipe (rich assumes 80 there).
    out = Console() if Console().is_terminal else Console(width=200)
    out.print(_eval_table(documents, summary))


@cli.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (APP_HOST). (default: 0.0.0.0 with APP_API_KEYS, else 127.0.0.1)"
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (APP_PORT). (default: 8000)")] = None,
) -> None:
    """Run the dsocr server in this process, configured by APP_* variables (see the README)."""
    from app.__main__ import main  # the service, only when asked for: the client runs without it

    if host:
        os.environ["APP_HOST"] = host
    if port:
        os.environ["APP_PORT"] = str(port)
    main()


@cli.command()
def worker(
    port: Annotated[
        int | None, typer.Option(help="Port for /healthz, /readyz and /metrics (APP_PORT). (default: 8000)")
    ] = None,
) -> None:
    """Run a worker of a scaled-out deployment: it takes tasks from the shared Redis queue and
    writes results to the bucket (APP_ROLE=worker; APP_QUEUE_BACKEND=redis and APP_STORAGE_BACKEND=s3
    with their settings are needed, see the README "Scaling out")."""
    os.environ["APP_ROLE"] = "worker"
    serve(host=None, port=port)


def _print_task(client_call: str, url: str | None, api_key: str | None, task_id: str) -> None:
    with Client(url, api_key) as client:
        try:
            task = client.cancel(task_id) if client_call == "cancel" else client.get(task_id)
        except DsocrError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(json.dumps(task.raw, indent=2))


@cli.command()
def status(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Print a task's view (status, progress, error, links) as JSON."""
    _print_task("get", url, api_key, task_id)


@cli.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Cancel a queued task, or a running one at its next page; print its view as JSON."""
    _print_task("cancel", url, api_key, task_id)


@cli.command()
def mcp(
    url: UrlOption = None,
    api_key: KeyOption = None,
    http: Annotated[bool, typer.Option(help="Serve streamable HTTP instead of stdio.")] = False,
    host: Annotated[str, typer.Option(help="With --http: address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="With --http: port to listen on.")] = 8765,
) -> None:
    """Run an MCP server (stdio, or streamable HTTP with --http) whose tools convert documents with
    the dsocr server: convert_document, get_layout, get_figure."""
    from dsocr_client.mcp_server import serve_mcp

    serve_mcp(url, api_key, http=http, host=host, port=port)


def main() -> None:
    """Entry point of the ``dsocr`` console script."""
    cli()


if __name__ == "__main__":
    main()

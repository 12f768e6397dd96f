"""chunks.json: the document split along its structure, each chunk citing its pages and boxes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from app.errors import InvalidOptions
from app.formats import ChunkSet, iter_chunks, load_counter, stream_chunks_json
from app.formats.tokens import CharEstimate
from tests.test_formats_segments import (
    FIGURE_CAPTION,
    OUTLOOK,
    PARAGRAPH_1,
    PARAGRAPH_2,
    RESULTS,
    TABLE_CAPTION,
    TABLE_HTML,
    TITLE,
    Sample,
    build_sample,
)
from tests.tiny_model import build_tiny_tokenizer

CHARS = CharEstimate()
TOKENIZER = "local/tiny-tokenizer"  # a Hub repository id, present only in the test's cache


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding one tokenizer, laid out as huggingface_hub writes it
    (models--org--name/refs/main naming a snapshot folder with the repository's files)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--local--tiny-tokenizer"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    build_tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_without_a_cut_the_chunks_join_back_into_full_md(sample: Sample) -> None:
    chunks = list(iter_chunks(sample.result, CHARS, max_tokens=4000))

    assert "\n\n".join(chunk.text for chunk in chunks) + "\n" == sample.full_md
    # A title and each sub-title open a chunk, and set the heading path of what follows.
    assert [chunk.text.split("\n", 1)[0] for chunk in chunks] == [f"# {TITLE}", f"## {OUTLOOK}"]
    assert [chunk.headings for chunk in chunks] == [[TITLE, RESULTS], [TITLE, OUTLOOK]]
    assert [chunk.pages for chunk in chunks] == [[1], [2]]
    for chunk in chunks:
        assert sample.full_md[chunk.start : chunk.end] == chunk.text
        assert chunk.overlap_chars == 0
        assert chunk.tokens == CHARS.count(chunk.text)


def test_paragraphs_are_cut_only_past_max_tokens_and_the_rest_stays_whole(sample: Sample) -> None:
    max_tokens = 40  # 160 characters: both paragraphs must be cut, the table cannot fit

    chunks = list(iter_chunks(sample.result, CHARS, max_tokens=max_tokens))

    # In order, without overlap, and nothing but whitespace between one chunk and the next.
    position = 0
    for chunk in chunks:
        assert chunk.start >= position
        assert not sample.full_md[position : chunk.start].strip()
        assert sample.full_md[chunk.start : chunk.end] == chunk.text
        position = chunk.end
    assert not sample.full_md[position:].strip()
    whole = [chunk for chunk in chunks if TABLE_HTML in chunk.text or "\\frac" in chunk.text]
    assert [chunk.tokens > max_tokens for chunk in whole] == [True, False]  # the table, the equation
    assert TABLE_CAPTION in whole[0].text  # the caption stays with its table
    for chunk in chunks:
        if chunk not in whole:
            assert chunk.tokens <= max_tokens, chunk.text
    # The paragraph's pieces end at sentence ends or between words, and give it back joined.
    pieces = [chunk for chunk in chunks if any((b.index, b.block) == (0, 2) for b in chunk.blocks)]
    assert len(pieces) >= 3
    assert PARAGRAPH_1 in sample.full_md[pieces[0].start : pieces[-1].end]
    assert all(sample.full_md[piece.end] == " " for piece in pieces[:-1])
    assert any(piece.text.endswith(".") for piece in pieces[:-1])
    figure = next(chunk for chunk in chunks if chunk.figures)
    assert FIGURE_CAPTION in figure.text
    assert "![](images/p0001_01.png)" in figure.text


def test_chunk_boxes_are_the_boxes_of_the_blocks_in_their_text(sample: Sample) -> None:
    # Where each block's Markdown sits in full.md (every block's content is unique in the sample).
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for page in sample.result["pages"]:
        for i, block in enumerate(page["blocks"]):
            content = f"![]({block['image']})" if block.get("image") else block["text"]
            start = sample.full_md.find(content)
            assert start >= 0
            spans[(page["index"], i)] = (start, start + len(content))

    chunks = list(iter_chunks(sample.result, CHARS, max_tokens=40, overlap=5))

    cited: set[tuple[int, int]] = set()
    for chunk in chunks:
        own_start = chunk.start + chunk.overlap_chars
        inside = {key for key, (start, end) in spans.items() if start < chunk.end and own_start < end}
        assert {(cite.index, cite.block) for cite in chunk.blocks} == inside
        assert chunk.pages == sorted({sample.result["pages"][index]["page"] for index, _ in inside})
        for cite in chunk.blocks:
            stored = sample.result["pages"][cite.index]["blocks"][cite.block]
            assert (cite.page, cite.type) == (sample.result["pages"][cite.index]["page"], stored["type"])
            assert (cite.bbox, cite.bbox_norm, cite.bbox_pt) == (
                stored["bbox"],
                stored["bbox_norm"],
                stored["bbox_pt"],
            )
        cited |= inside
    assert cited == set(spans)


def test_figures_carry_their_crop_and_caption(sample: Sample) -> None:
    chunks = list(iter_chunks(sample.result, CHARS, link_base="/v1/tasks/t1/images/"))

    [figure] = [figure for chunk in chunks for figure in chunk.figures]
    assert figure.name in sample.crops
    assert figure.link == f"/v1/tasks/t1/images/{figure.name}"
    assert (figure.caption, figure.page) == (FIGURE_CAPTION, 1)
    assert sample.result["pages"][0]["blocks"][figure.block]["image"] == f"images/{figure.name}"


def test_overlap_repeats_the_end_of_the_chunk_before_within_max_tokens(sample: Sample) -> None:
    chunks = list(iter_chunks(sample.result, CHARS, max_tokens=40, overlap=8))

    overlapping = [(before, chunk) for before, chunk in itertools.pairwise(chunks) if chunk.overlap_chars]
    assert len(overlapping) >= 3
    for before, chunk in overlapping:
        repeated = chunk.text[: chunk.overlap_chars].rstrip()
        assert repeated
        assert before.text.endswith(repeated)
        assert sample.full_md[chunk.start - 1].isspace()  # whole words
        assert 0 < CHARS.count(repeated) <= 8
        assert chunk.tokens <= 40
        assert chunk.headings == before.headings  # never across a section
    for chunk in chunks:
        if chunk.text.startswith("#") or TABLE_HTML in chunk.text:
            assert chunk.overlap_chars == 0


def test_a_local_hugging_face_tokenizer_counts_the_tokens(sample: Sample, hub_cache: Path) -> None:
    counter = load_counter(TOKENIZER, cache_dir=hub_cache)
    tokenizer = build_tiny_tokenizer()

    chunks = list(iter_chunks(sample.result, counter, max_tokens=60, overlap=10))

    for chunk in chunks:
        assert chunk.tokens == len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"])
        if TABLE_HTML not in chunk.text:
            assert chunk.tokens <= 60
    assert chunks[-1].text.endswith(PARAGRAPH_2[-30:])
    # Cut into pieces that overlap, the first one too: it continues the text before it.
    pieces = [chunk for chunk in chunks if chunk.blocks[-1].block == 5 and chunk.blocks[-1].index == 1]
    assert len(pieces) >= 3
    assert all(piece.overlap_chars for piece in pieces)
    document = ChunkSet.model_validate_json(
        b"".join(stream_chunks_json(sample.result, counter, max_tokens=60, overlap=10))
    )
    assert document.tokenizer == TOKENIZER
    assert document.chunks == chunks


@pytest.mark.parametrize("name", ["local/not-cached", "/etc", "../../etc/passwd", "a/b/c", ""])
def test_a_tokenizer_that_is_not_a_cached_repository_is_refused(hub_cache: Path, name: str) -> None:
    with pytest.raises(InvalidOptions, match="tokenizer"):
        load_counter(name, cache_dir=hub_cache)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_impossible_limits_are_refused_before_any_byte(sample: Sample, max_tokens: int, overlap: int) -> None:
    with pytest.raises(InvalidOptions):
        next(stream_chunks_json(sample.result, CHARS, max_tokens=max_tokens, overlap=overlap))


def test_the_json_document_streams_what_the_model_describes(sample: Sample) -> None:
    data = b"".join(stream_chunks_json(sample.result, CHARS, max_tokens=50))

    document = ChunkSet.model_validate_json(data)
    assert (document.version, document.tokenizer, document.max_tokens, document.overlap) == (
        1,
        "chars",
        50,
        0,
    )
    assert document.chunks == list(iter_chunks(sample.result, CHARS, max_tokens=50))
    assert (
        json.loads(data)["chunks"][0]["blocks"][0]["bbox_pt"]
        == sample.result["pages"][0]["blocks"][0]["bbox_pt"]
    )


def test_a_folder_named_like_a_repository_is_not_loaded(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tokenizer under the working directory at "local/in-cwd": a request naming it must not
    # make the server read it, only the Hugging Face cache.
    build_tiny_tokenizer().save_pretrained(tmp_path / "local" / "in-cwd")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InvalidOptions, match="not in this server's Hugging Face cache"):
        load_counter("local/in-cwd", cache_dir=hub_cache)

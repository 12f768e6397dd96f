"""Reading a figure's crop for an export, whatever holds it (a store, a dict, a folder)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.result_files import IMAGE_NAME

ImageSource = Callable[[str], bytes | None] | Mapping[str, bytes]
"""Where exports read crops: a callable taking a crop's name (``p0001_01.png``) and returning its
bytes, or None when the task has no such crop; or a mapping from name to bytes."""

# What a crop may be, by its first bytes. The pipeline writes PNG; the others cost nothing to know.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def load_image(source: ImageSource, name: str) -> tuple[bytes, str] | None:
    """The crop called ``name`` and its media type; None when the name is not a crop's name
    (``pNNNN_NN.png``), the source has no such crop, or its bytes are not an image we can name."""
    if not IMAGE_NAME.match(name):
        return None
    data = source.get(name) if isinstance(source, Mapping) else source(name)
    if data is None:
        return None
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return data, media_type
    return None

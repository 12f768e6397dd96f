"""What a document is, told from its first bytes, never from its name or a Content-Type header.

Clients mislabel files (``application/octet-stream``, a ``.pdf`` that is a JPEG), so the bytes
decide. Only the kinds the pipeline can render are recognised; anything else is ``None``.
"""

from __future__ import annotations

from app.documents import DocumentKind

SNIFF_BYTES = 1024  # how many leading bytes ``sniff`` needs to decide

# The DIB header that follows a BMP file header starts with its own size; these are the sizes of
# the versions in use (OS/2 core, BITMAPINFOHEADER, the Adobe variants, V4, V5). Checking it keeps
# any text that happens to start with "BM" from passing for a bitmap.
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff(head: bytes) -> DocumentKind | None:
    """Return the kind of a document from its first ``SNIFF_BYTES`` bytes, or ``None`` if unsupported.

    Fewer bytes may be given (a short file); the answer is then ``None`` where a signature is cut.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return DocumentKind.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return DocumentKind.JPEG
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return DocumentKind.WEBP
    # Classic TIFF (42) and BigTIFF (43), little- and big-endian; Pillow reads both.
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return DocumentKind.TIFF
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return DocumentKind.BMP
    # Readers accept a PDF header after leading junk (mail gateways, BOMs); so does the spec's
    # implementation note, within the first 1024 bytes.
    if b"%PDF-" in head[:SNIFF_BYTES]:
        return DocumentKind.PDF
    return None

"""One task's pages end to end, without HTTP: receive, sniff, render, recognise, parse, assemble.

- ``sources``: uploads and URL downloads to a spooled file; ``sniff``: a document's kind from its bytes
- ``render_pool.RenderPool``: opens, counts and renders documents in killable processes
  (``render_child``, which runs ``pages``: PyMuPDF and Pillow)
- ``run.PagePipeline``: pages to the engine and back, in order, into the store
- ``grounding``: the model's grounded output parsed; ``assemble``: Markdown, layout and crops
"""

# Modules, not names: the render child imports ``pages`` alone, and must not load the engines.
__all__ = [
    "assemble",
    "grounding",
    "pages",
    "render_child",
    "render_pool",
    "run",
    "sniff",
    "sources",
]

"""dsocr-server: a self-hosted document OCR service around DeepSeek-OCR."""

__version__ = "0.1.0"

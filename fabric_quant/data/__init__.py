"""Real data that needs no download: Python's own documentation topics."""

from fabric_quant.data.pydoc_text import topic_paragraphs

__all__ = ["topic_paragraphs"]

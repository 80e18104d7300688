"""Paragraphs of ``pydoc_data.topics`` (the reference documentation every CPython ships), labelled by topic."""

from __future__ import annotations

import re


def topic_paragraphs(min_chars: int = 80, max_chars: int = 2000) -> list[tuple[str, str]]:
    """``(topic, paragraph)`` pairs of prose paragraphs, in a fixed order.

    Indented blocks (code, grammar) and headings are skipped so the text is natural language.
    """
    from pydoc_data.topics import topics

    pairs = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1]) <= set("*=-"):
                continue
            text = " ".join(line.strip() for line in lines)
            if min_chars <= len(text) <= max_chars:
                pairs.append((topic, text))
    return pairs

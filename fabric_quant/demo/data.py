"""Real data that needs no download: paragraphs of ``pydoc_data.topics`` (the reference documentation every CPython
ships), labelled by topic, and the classification task built on them."""

from __future__ import annotations

import re
from collections import defaultdict


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


def pydoc_topics(min_per_topic: int) -> list[dict]:
    """The built-in task: classify a paragraph of Python's documentation by its topic."""
    by_topic = defaultdict(list)
    for topic, text in topic_paragraphs():
        by_topic[topic].append(text)
    records = [
        {"text": t, "label": k} for k, texts in sorted(by_topic.items()) if len(texts) >= min_per_topic for t in texts
    ]
    if len({r["label"] for r in records}) < 2:
        raise ValueError(f"min_per_topic={min_per_topic} leaves fewer than 2 topics; lower it")
    return records

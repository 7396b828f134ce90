"""Data: synthetic visual QA (``shapes``) and offline real text (``text``)."""

from mmlab.data.shapes import QUESTION_TYPES, Sample, make_sample, shapes
from mmlab.data.text import offline_corpus, wikitext2

__all__ = ["QUESTION_TYPES", "Sample", "make_sample", "shapes", "offline_corpus", "wikitext2"]

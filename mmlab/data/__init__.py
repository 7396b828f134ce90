"""Data: synthetic visual QA (``shapes``, ``multi_image``) and offline real text (``text``, ``needle``)."""

from mmlab.data.shapes import QUESTION_TYPES, MultiImageSample, Sample, make_sample, multi_image, shapes
from mmlab.data.text import TextQA, needle, offline_corpus, prose_corpus, wikitext2

__all__ = ["QUESTION_TYPES", "MultiImageSample", "Sample", "TextQA", "make_sample", "multi_image", "needle",
           "offline_corpus", "prose_corpus", "shapes", "wikitext2"]

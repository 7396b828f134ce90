"""lmms-eval hooks of mmlab's own tasks (loaded by lmms-eval from the YAMLs next to this file)."""

from types import SimpleNamespace

from mmlab.evaluate import is_correct


def doc_to_visual(doc):
    images = doc["images"] if "images" in doc else [doc["image"]]
    return [im.convert("RGB") for im in images]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(is_correct(results[0], SimpleNamespace(answer=doc["answer"])))}

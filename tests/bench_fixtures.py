"""Tiny local copies of real benchmarks, in the real data sets' schemas (column names and types of
lmms-lab's POPE / GQA / MME / ScienceQA-IMG), with task YAMLs that call lmms-eval's own task
functions (prompts, parsing, metrics); only the data comes from mmlab's shapes scenes. And a
PIQA-schema multiple-choice task for lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

from mmlab.data import make_sample
from mmlab.data.shapes import COLORS

T = "!function lmms_eval.tasks"


def _yaml(name: str, files: dict, body: str) -> str:
    data = "\n".join(f"    {split}: {path}" for split, path in files.items())
    return f"task: {name}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n{data}\n{body}"


def _smalls(n: int):
    """(image, [(question, yes/no answer)...]) from test scenes that have a small object: one
    question whose answer is yes and one whose answer is no."""
    out, i = [], 0
    while len(out) < n:
        s = make_sample(i, seed=7, split="test", qtype="small")
        i += 1
        present = sorted({o.color for o in s.objects if o.small})
        if not present:
            continue
        absent = [c for c in COLORS if c not in present]
        out.append((s.image, [(f"is there a small {present[0]} shape ?", "yes"),
                              (f"is there a small {absent[i % len(absent)]} shape ?", "no")]))
    return out


def write_pope(root: Path, n: int = 6) -> str:
    import datasets

    rows = [{"id": str(k), "question_id": str(k), "question": q, "answer": a, "image_source": f"shapes_{k // 2}",
             "image": img, "category": "adversarial"}
            for k, (img, qa) in enumerate(x for x in _smalls((n + 1) // 2)) for q, a in qa][:n]
    rows = [dict(r, id=str(k), question_id=str(k)) for k, r in enumerate(rows)]
    _parquet(root / "pope.parquet", rows, {"image": datasets.Image()})
    body = f"""test_split: test
output_type: generate_until
doc_to_visual: {T}.pope.utils.pope_doc_to_visual
doc_to_text: {T}.pope.utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
process_results: {T}.pope.utils.pope_process_results
metric_list:
  - {{metric: pope_accuracy, aggregation: {T}.pope.utils.pope_aggregate_accuracy, higher_is_better: true}}
  - {{metric: pope_f1_score, aggregation: {T}.pope.utils.pope_aggregate_f1_score, higher_is_better: true}}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
"""
    (root / "fixture_pope.yaml").write_text(_yaml("fixture_pope", {"test": root / "pope.parquet"}, body))
    return "fixture_pope"


def write_gqa(root: Path, n: int = 6) -> str:
    """GQA's instructions table (questions with an imageId) and its separate images table, joined by
    a local process_docs as lmms-eval's gqa_process_docs joins the hub's."""
    import datasets

    samples = [make_sample(i, seed=5, split="test", qtype="color") for i in range(n)]
    _parquet(root / "gqa_images.parquet", [{"id": f"img{i}", "image": s.image} for i, s in enumerate(samples)],
             {"image": datasets.Image()})
    _parquet(root / "gqa.parquet", [{"id": str(i), "imageId": f"img{i}", "question": s.question, "answer": s.answer,
                                     "fullAnswer": f"the shape is {s.answer} .", "isBalanced": True}
                                    for i, s in enumerate(samples)], {})
    (root / "fixture_gqa_utils.py").write_text(f'''import datasets


def gqa_process_docs(dataset):
    images = {{r["id"]: r["image"] for r in datasets.load_dataset("parquet", data_files="{root}/gqa_images.parquet",
                                                                   split="train")}}
    return dataset.map(lambda d: {{"image": images[d["imageId"]]}})
''')
    body = f"""test_split: test
output_type: generate_until
process_docs: !function fixture_gqa_utils.gqa_process_docs
doc_to_visual: {T}.gqa.utils.gqa_doc_to_visual
doc_to_text: {T}.gqa.utils.gqa_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
"""
    (root / "fixture_gqa.yaml").write_text(_yaml("fixture_gqa", {"test": root / "gqa.parquet"}, body))
    return "fixture_gqa"


def write_mme(root: Path, n_images: int = 3) -> str:
    """MME: two yes/no questions per image (question_id = the image file), scored by its paired score."""
    import datasets

    rows = [{"question_id": f"shapes/{k}.png", "image": img, "question": f"{q} Please answer yes or no.",
             "answer": a.capitalize(), "category": "existence"}
            for k, (img, qa) in enumerate(_smalls(n_images)) for q, a in qa]
    _parquet(root / "mme.parquet", rows, {"image": datasets.Image()})
    body = f"""test_split: test
output_type: generate_until
doc_to_visual: {T}.mme.utils.mme_doc_to_visual
doc_to_text: {T}.mme.utils.mme_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
process_results: {T}.mme.utils.mme_process_results
metric_list:
  - {{metric: mme_perception_score, aggregation: {T}.mme.utils.mme_aggregate_results, higher_is_better: true}}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
"""
    (root / "fixture_mme.yaml").write_text(_yaml("fixture_mme", {"test": root / "mme.parquet"}, body))
    return "fixture_mme"


def write_scienceqa_img(root: Path, n: int = 6) -> str:
    """ScienceQA-IMG: multiple choice (choices list, integer answer), hint as context, letter answers."""
    import datasets

    rows = []
    for i in range(n):
        s = make_sample(i, seed=9, split="test", qtype="color")
        wrong = [c for c in COLORS if c != s.answer][i % (len(COLORS) - 1)]
        choices = [s.answer, wrong] if i % 2 == 0 else [wrong, s.answer]
        rows.append({"image": s.image, "question": s.question, "choices": choices, "answer": choices.index(s.answer),
                     "hint": "", "task": "closed choice", "grade": "grade1", "subject": "natural science",
                     "topic": "shapes", "category": "colors", "skill": "identify colors", "lecture": "",
                     "solution": ""})
    _parquet(root / "sqa.parquet", rows, {"image": datasets.Image(), "choices": datasets.Sequence(datasets.Value(
        "string")), "answer": datasets.Value("int64")})
    body = f"""test_split: test
output_type: generate_until
doc_to_visual: {T}.scienceqa.utils.sqa_doc_to_visual
doc_to_text: {T}.scienceqa.utils.sqa_doc_to_text
doc_to_target: {T}.scienceqa.utils.sqa_doc_to_target
generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false}}
process_results: {T}.scienceqa.utils.sqa_process_results
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
lmms_eval_specific_kwargs:
  default:
    format: default
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
"""
    (root / "fixture_sqa_img.yaml").write_text(_yaml("fixture_sqa_img", {"test": root / "sqa.parquet"}, body))
    return "fixture_sqa_img"


def write_shapes_mc(root: Path, n: int = 6) -> str:
    """A loglikelihood (multiple-choice) image task: the answer word scored against a wrong one."""
    import datasets

    rows = []
    for i in range(n):
        s = make_sample(i, seed=11, split="test", qtype="color")
        wrong = [c for c in COLORS if c != s.answer][i % (len(COLORS) - 1)]
        rows.append({"image": s.image, "question": s.question, "choices": [s.answer, wrong], "answer": 0})
    _parquet(root / "mc.parquet", rows, {"image": datasets.Image(), "choices": datasets.Sequence(datasets.Value(
        "string")), "answer": datasets.Value("int64")})
    (root / "fixture_mc_utils.py").write_text('''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
''')
    body = """test_split: test
output_type: multiple_choice
doc_to_visual: !function fixture_mc_utils.doc_to_visual
doc_to_text: !function fixture_mc_utils.doc_to_text
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""
    (root / "fixture_mc.yaml").write_text(_yaml("fixture_mc", {"test": root / "mc.parquet"}, body))
    return "fixture_mc"


PIQA = [("To keep food cold,", "put it in the fridge.", "put it in the oven.", 0),
        ("To dry wet hands,", "wash them again.", "use a towel.", 1),
        ("To see in a dark room,", "turn on the light.", "close the window.", 0),
        ("To cut paper,", "use a spoon.", "use scissors.", 1),
        ("To boil water,", "put it on the stove.", "put it in the freezer.", 0),
        ("To write a letter,", "use a pen.", "use a fork.", 0)]


def write_piqa(root: Path) -> str:
    """lm-eval's PIQA task (its doc_to_text / doc_to_choice templates) over a local JSON file."""
    path = root / "piqa.jsonl"
    path.write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b, "label": lab}) + "\n"
                            for g, a, b, lab in PIQA))
    (root / "fixture_piqa.yaml").write_text(f"""task: fixture_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""")
    return "fixture_piqa"


def _parquet(path: Path, rows: list[dict], feats: dict) -> None:
    import datasets

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    features = datasets.Features({k: feats.get(k) or datasets.Dataset.from_dict({k: v}).features[k]
                                  for k, v in cols.items()})
    datasets.Dataset.from_dict(cols, features=features).to_parquet(str(path))


def write_all(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [write_pope(root), write_gqa(root), write_mme(root), write_scienceqa_img(root)]

"""Synthetic visual QA: coloured shapes on a plain background.

Every sample is deterministic from ``(split, seed, index)``, so a held-out split never
shares a random stream with the training split. The four question types need different
visual evidence, which is what makes token pruning measurable:

- ``color``    "what color is the circle ?"           -> needs the tokens of one object
- ``count``    "how many shapes are there ?"          -> needs every object
- ``position`` "is the red shape on the left or right ?"  -> needs one named object's position
- ``small``    "is there a small red shape ?"         -> needs a one-patch object

Answers are single words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "count", "position", "small")
SPLITS = {"train": 0, "val": 1, "test": 2}
BIG = (22, 30)  # object diameter in pixels (a 96 px image has 8 px patches)
SMALL = (8, 10)


@dataclass
class Obj:
    shape: str
    color: str
    x: int  # centre
    y: int
    size: int

    @property
    def small(self) -> bool:
        return self.size < BIG[0]

    def box(self) -> tuple[int, int, int, int]:
        h = self.size // 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass
class Sample:
    """One VQA example. ``image`` is an RGB PIL image; ``objects`` the scene's ground truth."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[Obj] = field(default_factory=list)
    uid: str = ""

    def __repr__(self) -> str:
        return f"Sample({self.uid!r}, {self.question!r} -> {self.answer!r}, {self.qtype})"


def _draw(objs: list[Obj], ids: bool = False) -> Image.Image:
    """The RGB scene, or (``ids=True``) a label map with object k drawn as value k + 1."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    img = Image.new("L", size, 0) if ids else Image.new("RGB", size, (128, 128, 128))
    d = ImageDraw.Draw(img)
    for k, o in enumerate(objs):
        c = k + 1 if ids else COLORS[o.color]
        x0, y0, x1, y1 = o.box()
        if o.shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=c)
        elif o.shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=c)
        elif o.shape == "triangle":
            d.polygon([(o.x, y0), (x1, y1), (x0, y1)], fill=c)
        else:  # diamond
            d.polygon([(o.x, y0), (x1, o.y), (o.x, y1), (x0, o.y)], fill=c)
    return img


def _scene(rng: np.random.Generator) -> list[Obj]:
    n = int(rng.integers(1, 5))
    shapes = rng.permutation(len(SHAPES))[:n]
    colors = rng.permutation(len(COLORS))[:n]
    names = list(COLORS)
    objs: list[Obj] = []
    for s, c in zip(shapes, colors):
        small = rng.random() < 0.3
        size = int(rng.integers(*SMALL)) if small else int(rng.integers(*BIG))
        for _ in range(200):  # rejection-sample a non-overlapping position
            h = size // 2 + 1
            x, y = int(rng.integers(h, IMAGE_SIZE - h)), int(rng.integers(h, IMAGE_SIZE - h))
            if all(abs(x - o.x) > (size + o.size) // 2 + 3 or abs(y - o.y) > (size + o.size) // 2 + 3 for o in objs):
                break
        objs.append(Obj(SHAPES[s], names[c], x, y, size))
    return objs


def _question(rng: np.random.Generator, objs: list[Obj], qtype: str, want_yes: bool) -> tuple[str, str] | None:
    if qtype == "color":
        big = [o for o in objs if not o.small]
        if not big:
            return None
        o = big[int(rng.integers(len(big)))]
        return f"what color is the {o.shape} ?", o.color
    if qtype == "count":
        return "how many shapes are there ?", NUMBERS[len(objs)]
    if qtype == "position":  # which half of the image a named (big, clearly off-centre) object is in
        clear = [o for o in objs if not o.small and abs(o.x - IMAGE_SIZE // 2) >= 8]
        if not clear:
            return None
        o = clear[int(rng.integers(len(clear)))]
        return f"is the {o.color} shape on the left or right ?", "left" if o.x < IMAGE_SIZE // 2 else "right"
    smalls = [o for o in objs if o.small]
    if want_yes:  # balanced yes / no: the coin is drawn once per sample, a scene without a small object is redrawn
        if not smalls:
            return None
        return f"is there a small {smalls[int(rng.integers(len(smalls)))].color} shape ?", "yes"
    present = {o.color for o in smalls}
    absent = [c for c in COLORS if c not in present]
    return f"is there a small {absent[int(rng.integers(len(absent)))]} shape ?", "no"


def patch_labels(objs: list[Obj], patch: int = 8) -> dict[str, np.ndarray]:
    """Per-patch ground truth (row-major): which object's colour / shape covers most of the
    patch (0 = background, else 1 + index into COLORS / SHAPES), its size (0 background,
    1 big, 2 small), the patch's own column on object patches (-100 on background) and
    whether an object's centre lies in the patch. Used only as an auxiliary training signal for tiny-llava."""
    lab = np.asarray(_draw(objs, ids=True))
    g = IMAGE_SIZE // patch
    blocks = lab.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    counts = np.stack([(blocks == k + 1).sum(1) for k in range(len(objs))], 1) if objs else np.zeros((g * g, 0))
    owner = np.where(counts.max(1, initial=0) > 0, counts.argmax(1) if objs else 0, -1)
    colors, shapes_ = list(COLORS), list(SHAPES)
    color = np.array([0 if k < 0 else 1 + colors.index(objs[k].color) for k in owner])
    shape = np.array([0 if k < 0 else 1 + shapes_.index(objs[k].shape) for k in owner])
    size = np.array([0 if k < 0 else 2 if objs[k].small else 1 for k in owner])
    xbin = np.where(owner < 0, -100, np.arange(g * g) % g)
    centre = np.zeros(g * g, dtype=np.int64)
    for o in objs:
        centre[min(o.y // patch, g - 1) * g + min(o.x // patch, g - 1)] = 1
    return {"color": color, "shape": shape, "size": size, "xbin": xbin, "centre": centre}


def make_sample(index: int, seed: int = 0, split: str = "test", qtype: str | None = None) -> Sample:
    """The ``index``-th sample of ``split`` under ``seed`` (question types cycle unless ``qtype`` is given)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
    qt = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    if qt not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qt!r}; valid: {list(QUESTION_TYPES)}")
    rng = np.random.default_rng([SPLITS[split], seed, index])
    want_yes = bool(rng.random() < 0.5)
    while True:  # a few scenes cannot host a question type (e.g. no two big objects); draw again
        objs = _scene(rng)
        qa = _question(rng, objs, qt, want_yes)
        if qa is not None:
            break
    return Sample(_draw(objs), qa[0], qa[1], qt, objs, uid=f"{split}-{seed}-{index}")


def scene_with_questions(index: int, seed: int = 0,
                         split: str = "train") -> tuple[Image.Image, list[Obj], list[tuple[str, str, str]]]:
    """One scene and a question of every type it can host, in random order (training turns)."""
    rng = np.random.default_rng([SPLITS[split] + 10, seed, index])
    objs = _scene(rng)
    qas = []
    for qt in rng.permutation(QUESTION_TYPES):
        qa = _question(rng, objs, str(qt), want_yes=bool(rng.random() < 0.5))
        if qa is None and qt == "small":
            qa = _question(rng, objs, "small", want_yes=False)
        if qa is not None:
            qas.append((qa[0], qa[1], str(qt)))
    return _draw(objs), objs, qas


def scene_with_all_questions(index: int, seed: int = 0, split: str = "train",
                              max_questions: int = 8) -> tuple[Image.Image, list[Obj], list[tuple[str, str, str]]]:
    """One scene and (up to ``max_questions``, shuffled) every question it can host: the count, the
    colour of each big object, the side of each clearly off-centre big object, a yes for each small
    object's colour and one no (a long training conversation: more answers per image)."""
    rng = np.random.default_rng([SPLITS[split] + 20, seed, index])
    objs = _scene(rng)
    qas = [("how many shapes are there ?", NUMBERS[len(objs)], "count")]
    qas += [(f"what color is the {o.shape} ?", o.color, "color") for o in objs if not o.small]
    qas += [(f"is the {o.color} shape on the left or right ?", "left" if o.x < IMAGE_SIZE // 2 else "right",
             "position") for o in objs if not o.small and abs(o.x - IMAGE_SIZE // 2) >= 8]
    qas += [(f"is there a small {o.color} shape ?", "yes", "small") for o in objs if o.small]
    absent = [c for c in COLORS if c not in {o.color for o in objs if o.small}]
    qas.append((f"is there a small {absent[int(rng.integers(len(absent)))]} shape ?", "no", "small"))
    order = rng.permutation(len(qas))[:max_questions]
    return _draw(objs), objs, [qas[i] for i in order]


def shapes(n: int = 200, seed: int = 0, split: str = "test") -> list[Sample]:
    """``n`` deterministic samples, question types balanced (they cycle)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [make_sample(i, seed, split) for i in range(n)]


def vocabulary() -> list[str]:
    """Every word a question or answer can contain (the tiny model's word-level vocabulary)."""
    words = {"what", "color", "is", "the", "how", "many", "shapes", "are", "there", "?", "left", "or",
             "right", "a", "small", "shape", "yes", "no", "on"}
    words |= set(SHAPES) | set(COLORS) | set(NUMBERS)
    return sorted(words)


@dataclass
class MultiImageSample:
    """Several images in one prompt; the question is about the last one (the others are context
    that a KV method may compress). ``query_after``: the question is fed after that compression."""

    images: list
    question: str
    answer: str
    qtype: str
    uid: str = ""
    query_after: bool = True

    def __repr__(self) -> str:
        return f"MultiImageSample({self.uid!r}, {len(self.images)} images, {self.question!r} -> {self.answer!r})"


def multi_image(n: int = 100, n_images: int = 3, seed: int = 0, split: str = "test") -> list[MultiImageSample]:
    """``n`` prompts of ``n_images`` shapes scenes each: ``n_images - 1`` distractor scenes, then the
    scene the question is about (last, nearest the question). Deterministic from (split, seed, index)."""
    if n < 1 or n_images < 1:
        raise ValueError(f"n and n_images must be >= 1, got n={n}, n_images={n_images}")
    out = []
    for i in range(n):
        target = make_sample(i, seed, split)
        others = [make_sample(i * n_images + j, seed + 1000, split).image for j in range(n_images - 1)]
        out.append(MultiImageSample([*others, target.image], target.question, target.answer, target.qtype,
                                    f"{target.uid}-x{n_images}"))
    return out

"""tiny-llava, mmlab's embedded VLM: a stock ``LlavaForConditionalGeneration`` with a word-level
tokenizer and no processor. Its prompt is LLaVA-1.5's order written out
(``<s> user : <image> x 144 ... question assistant :``; ``tiny-llava-deep`` opens with the system
turn its config names), images are resized to 96 px and scaled to [-1, 1], and calibration uses
training-split shapes questions. Selected by name (its config says ``llava``), never by model_type."""

from __future__ import annotations

from pathlib import Path

import torch

from mmlab.arch.base import Inputs, images_and_text, register
from mmlab.arch.llava import Llava
from mmlab.data.shapes import IMAGE_SIZE
from mmlab.methods.base import MethodError

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "tiny" / "checkpoints"


def prompt_text(question: str, n_image_tokens: int | list[int], system: str | None = None) -> str:
    """The chat template the tiny models are trained with (image tokens already expanded):
    LLaVA-1.5's order, image(s) first, then the question, after a system turn where the model has
    one (``tiny-llava-deep``). ``n_image_tokens`` may be a list (several images, one placeholder run each)."""
    runs = n_image_tokens if isinstance(n_image_tokens, list) else [n_image_tokens]
    head = f"<s> system : {system} user : " if system else "<s> user : "
    return head + "".join("<image> " * n for n in runs) + f"{question} assistant :"


def checkpoint_state(path: Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """A saved Llava checkpoint's weights under the model's own names (``model.vision_tower...``):
    checkpoints saved by ``save_pretrained`` store the legacy names (``vision_tower...``), which
    ``from_pretrained`` maps and a raw ``load_state_dict`` would silently miss. ``prefixes``: keep these."""
    from safetensors.torch import load_file

    def rename(k: str) -> str:
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            return "model." + k
        if k.startswith("language_model.model."):
            return "model.language_model." + k.removeprefix("language_model.model.")
        return k.removeprefix("language_model.")  # language_model.lm_head -> lm_head

    state = {rename(k): v for k, v in load_file(path / "model.safetensors").items()}
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def pixel_values(images) -> torch.Tensor:
    """PIL images -> normalised (B, 3, H, W) float tensor in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


@register
class TinyLlava(Llava):
    name = "tiny-llava"
    model_types = ()
    query_after = True
    text_perplexity = False  # its LM knows only the shapes vocabulary
    attention_classes = ("LlamaAttention",)

    def encode(self, sample) -> Inputs:
        images, text = images_and_text(sample)
        if not images:
            raise MethodError("tiny-llava answers questions about an image; give it an image sample")
        prompt = prompt_text(text, [self.model.config.image_seq_length] * len(images),
                             getattr(self.model.config, "mmlab_system_prompt", None))
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        return Inputs(ids, pixel_values(images), images=images,
                      context_len=self.question_start(prompt, ids, sample, add_special_tokens=False))

    def image_runs(self, ids: torch.Tensor, n_images: int) -> list[tuple[int, int]]:
        runs = super().image_runs(ids, n_images)
        if len(runs) == 1 and n_images > 1:  # several images written as one run of placeholders
            n, s = self.model.config.image_seq_length, runs[0][0]
            runs = [(s + k * n, s + (k + 1) * n) for k in range(n_images)]
        return runs

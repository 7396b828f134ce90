"""The shared half of every vision-language adapter: a processor encodes image + text, the
model's ``get_image_features`` gives each image's projected tokens, and they are written
into the runs of image placeholder tokens of the prompt."""

from __future__ import annotations

from typing import ClassVar

import torch

from mmlab.arch.base import Adapter, Inputs, Prompt, images_and_text
from mmlab.methods.base import MethodError


class VisionLanguageAdapter(Adapter):
    """A processor-driven VLM whose decoder is ``model.model.language_model``."""

    hf_class: ClassVar[str] = "AutoModelForImageTextToText"
    multimodal: ClassVar[bool] = True

    def encode(self, sample) -> Inputs:
        """The processor's chat template (or LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``) over the
        sample's images and question; the processor expands the image placeholders."""
        images, text = images_and_text(sample)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True)
        else:
            prompt = "USER: " + "<image>\n" * len(images) + text + " ASSISTANT:"
        enc = self.processor(images=images or None, text=prompt, return_tensors="pt")
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        ids = enc["input_ids"]
        return Inputs(ids, enc.get("pixel_values"), extra, images, self.question_start(prompt, ids, sample))

    def feature_kwargs(self, inputs: Inputs) -> dict:
        """What this family's ``get_image_features`` takes besides the pixels."""
        return {}

    def image_features(self, inputs: Inputs) -> list[torch.Tensor]:
        if inputs.pixel_values is None:
            return []
        out = self.model.model.get_image_features(inputs.pixel_values, **self.feature_kwargs(inputs))
        return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]

    def image_runs(self, ids: torch.Tensor, n_images: int) -> list[tuple[int, int]]:
        """(start, end) of each maximal run of image placeholder tokens, in prompt order."""
        is_img = ids == self.image_token_id
        prev = torch.cat([is_img.new_zeros(1), is_img[:-1]])
        nxt = torch.cat([is_img[1:], is_img.new_zeros(1)])
        starts = torch.nonzero(is_img & ~prev).flatten().tolist()
        ends = torch.nonzero(is_img & ~nxt).flatten().tolist()
        return [(s, e + 1) for s, e in zip(starts, ends)]

    def pruned_positions(self, inputs: Inputs, source: torch.Tensor) -> torch.Tensor:
        """Positions after image-feature methods shortened the prompt. 1-D RoPE: renumbered
        0..n-1, as LLaVA-based pruning code feeds the shortened sequence to the LLM."""
        return torch.arange(source.numel(), device=source.device)[None]

    def assemble(self, inputs: Inputs, feats: list[torch.Tensor], image_kept: dict) -> Prompt:
        """inputs_embeds with each image's (possibly pruned / merged) features in its placeholder run.
        ``image_kept[k]``: which of image k's tokens the features stand for (all when absent)."""
        ids = inputs.input_ids[0]
        emb = self.embed(inputs.input_ids)[0]
        runs = self.image_runs(ids, len(feats))
        if len(runs) != len(feats):
            raise MethodError(f"prompt has {len(runs)} image placeholder runs but {len(feats)} images")
        modality = torch.full((ids.numel(),), -1, dtype=torch.long)
        pieces, keep_idx, cursor = [], [], 0
        for k, ((s, e), f) in enumerate(zip(runs, feats)):
            modality[s:e] = k
            pieces.append(emb[cursor:s])
            keep_idx.append(torch.arange(cursor, s))
            kept = image_kept.get(k)
            if kept is None:
                if f.shape[0] != e - s:
                    raise MethodError(f"image {k}: {f.shape[0]} features for {e - s} placeholders "
                                      f"and no recorded selection (methods must call ctx.record_image_selection)")
                kept = torch.arange(e - s)
            pieces.append(f.to(emb.dtype))
            keep_idx.append(s + kept.to(torch.long))
            cursor = e
        pieces.append(emb[cursor:])
        keep_idx.append(torch.arange(cursor, ids.numel()))
        source = torch.cat(keep_idx).to(ids.device)
        return Prompt(torch.cat(pieces)[None], self.pruned_positions(inputs, source), source, modality)

    def calibration(self, n: int, length: int, data: str = "mixed") -> list[Inputs]:
        """``n`` training-split shapes questions (image + text); ``length`` and ``data`` are not used."""
        from mmlab.data import shapes

        return [self.encode(s) for s in shapes(n, seed=0, split="train")]

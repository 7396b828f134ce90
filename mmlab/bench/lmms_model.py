"""The lmms-eval model ``mmlab``: any mmlab model under any method spec, on any lmms-eval task.

Registered through lmms-eval's plugin entry point (group ``lmms_eval.models``, payload
``manifest``; in lmms-eval 0.7 ``@register_model`` alone does not make a name usable), so no fork::

    lmms-eval --model mmlab --model_args pretrained=llava-hf/llava-1.5-7b-hf,methods="divprune(keep_ratio=0.098)" \\
        --tasks pope,gqa,mme --output_path results/
    lmms-eval --model mmlab --model_args pretrained=tiny-llava --include_path "$(mmlab bench-tasks)" \\
        --tasks mmlab_shapes

model_args: ``pretrained`` (an mmlab name, Hugging Face id or path), ``methods`` (spec string),
``dtype`` (float32 / float16 / bfloat16), ``device``, ``attn_implementation``, ``max_new_tokens``
(overrides the task's), ``query_after`` (question fed after KV compression), ``chat_template``
(replaces the processor's), ``costs`` (sidecar JSON path; default ``mmlab_costs_<time>.json`` in the
CLI's ``--output_path``, else the working directory).
"""

from __future__ import annotations

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from mmlab.bench.costs import sidecar_path
from mmlab.bench.serve import Server
from mmlab.methods.base import MethodError
from mmlab.models import Bundle

ARGS = ("pretrained", "methods", "dtype", "device", "attn_implementation", "max_new_tokens", "query_after",
        "chat_template", "costs", "batch_size", "max_batch_size")


def _flat(visuals) -> list:
    out = []
    for v in visuals or []:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


class Scored(str):
    """One loglikelihood answer, ``(nll, is_greedy)``, typed as ``str``: lmms-eval 0.7.3's evaluator
    passes strings through and turns anything else that is not a generation into ``str(output)``
    (``api/instance.py: unwrap_generation_output``), which breaks every multiple-choice task; a str
    that unpacks to the pair survives it. The value is the negative log-likelihood (sum over the
    continuation's tokens): lmms-eval's multiple-choice scoring takes the argmin (its models return losses)."""

    def __new__(cls, nll: float, greedy: bool):
        obj = super().__new__(cls, f"({nll}, {greedy})")
        obj.pair = (nll, greedy)
        return obj

    def __iter__(self):
        return iter(self.pair)


class MMLab(lmms):
    is_simple = True

    def __init__(self, pretrained: str | Bundle = "tiny-llava", methods: str = "", dtype: str | None = None,
                 device: str | None = None, attn_implementation: str | None = None,
                 max_new_tokens: int | None = None, query_after: bool = False, chat_template: str | None = None,
                 costs: str | None = None, batch_size: int | str | None = 1, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise MethodError(f"mmlab model_args: unknown {', '.join(sorted(unknown))}; valid: {', '.join(ARGS)}")
        if batch_size not in (None, 1, "1"):
            raise MethodError(f"mmlab runs one request at a time (Traces are per sample); got batch_size={batch_size}")
        self.server = Server.open(pretrained, methods, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation, max_new_tokens=max_new_tokens,
                                  query_after=bool(query_after))
        if chat_template:
            for owner in (self.bundle.processor, self.bundle.tokenizer):
                if owner is not None:
                    owner.chat_template = chat_template
        self.costs_path = sidecar_path(costs)

    @property
    def bundle(self) -> Bundle:
        return self.server.bundle

    @property
    def device(self):
        return self.bundle.model.device

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests) -> list[GenerationResult]:
        out = []
        with self.server.session():
            for req in tqdm(requests, desc="mmlab answering", disable=len(requests) < 2):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                images = _flat(doc_to_visual(self._doc(task, split, doc_id)))
                until = gen_kwargs.get("until") or []
                text, counts = self.server.generate(task, doc_id, images, context,
                                                    max_new_tokens=gen_kwargs.get("max_new_tokens"),
                                                    until=[until] if isinstance(until, str) else list(until))
                out.append(GenerationResult(text, TokenCounts(**counts)))
        self.server.costs.write(self.costs_path)
        return out

    def loglikelihood(self, requests) -> list[Scored]:
        out = []
        with self.server.session():
            for req in tqdm(requests, desc="mmlab scoring", disable=len(requests) < 2):
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                images = _flat(doc_to_visual(doc))
                logp, greedy = self.server.loglikelihood(task, doc_id, images, context, continuation)
                out.append(Scored(-logp, greedy))
        self.server.costs.write(self.costs_path)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("mmlab answers single-round tasks (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported yet")

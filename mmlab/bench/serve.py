"""What both harness plugins (lmms-eval, lm-eval) call: one Bundle and one method list answering
requests, with every answer's cost recorded.

``Server.generate`` is greedy generation through the engine (``mmlab.run``'s path);
``Server.loglikelihood`` prefills the context under the methods (image-feature / in-LLM pruning,
then KV compression) and scores the continuation teacher-forced over the resulting cache, so a
multiple-choice score sees exactly the cache a generated answer would. Weight quantization is
swapped in once for a whole batch of requests (``Server.session``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from mmlab import engine
from mmlab.arch import Inputs
from mmlab.bench.costs import CostLog
from mmlab.methods import Method, MethodError, parse, spec
from mmlab.models import Bundle, load
from mmlab.quantize import applied


@dataclass
class Server:
    bundle: Bundle
    methods: list[Method] = field(default_factory=list)
    max_new_tokens: int | None = None  # overrides the task's generation length when set
    query_after: bool = False  # feed the question after the context's compression (KV methods)
    costs: CostLog = field(default_factory=CostLog)

    def __post_init__(self):
        m = self.bundle.model
        self.costs.meta = {"model": self.bundle.name, "methods": spec(self.methods), "dtype": str(m.dtype),
                           "device": str(m.device), "adapter": self.bundle.adapter.name}

    @classmethod
    def open(cls, pretrained, methods: str, *, dtype=None, device=None, attn_implementation=None,
             max_new_tokens=None, **kw) -> "Server":
        """From a harness's model_args: the spec is parsed first (a bad one fails before the model
        loads), then ``pretrained`` (an mmlab name, HF id or path, or a loaded Bundle)."""
        ms = parse(methods)
        bundle = pretrained if isinstance(pretrained, Bundle) else load(
            str(pretrained), dtype=dtype, device=device, attn_implementation=attn_implementation)
        return cls(bundle, ms, max_new_tokens=None if max_new_tokens is None else int(max_new_tokens), **kw)

    @contextlib.contextmanager
    def session(self):
        """The run's weight quantization in place for every request inside."""
        with applied(self.bundle, self.methods):
            yield

    def check(self, task: str, images: list) -> None:
        """One clear line when a task cannot be answered under this model or these methods."""
        if not images:
            need = [m.name for m in self.methods if m.needs_image]
            if need:
                raise MethodError(f"task {task!r} has text-only samples but {', '.join(need)} prunes visual tokens; "
                                  f"use it on an image task or drop it from methods")
        elif not self.bundle.multimodal:
            raise MethodError(f"task {task!r} gives images but {self.bundle.name} is a text-only model; "
                              f"use a vision-language model (e.g. tiny-llava, llava-hf/llava-1.5-7b-hf)")

    def _sample(self, images: list, text: str, raw: bool):
        if raw:  # lm-eval's text tasks: the harness wrote the whole prompt
            return {"prompt": text}
        return {"images": images, "question": text, "query_after": self.query_after}

    def generate(self, task: str, doc_id, images: list, text: str, *, max_new_tokens: int | None = None,
                 until: list[str] = (), raw: bool = False) -> tuple[str, dict]:
        """Greedy answer (cut at the first ``until`` string) and its token counts."""
        self.check(task, images)
        n = self.max_new_tokens or max_new_tokens or self.bundle.max_new_tokens
        trace = engine.run(self.bundle, self._sample(images, text, raw), self.methods, max_new_tokens=n)
        answer = trace.answer
        for stop in until:
            if stop:
                answer = answer.split(stop)[0]
        self.costs.add(task, doc_id, trace)
        return answer, {"input_tokens": trace.prompt_length, "output_tokens": len(trace.answer_ids)}

    def loglikelihood(self, task: str, doc_id, images: list, context: str, continuation: str,
                      raw: bool = False) -> tuple[float, bool]:
        """(sum of log-probabilities of ``continuation`` after ``context``, whether greedy decoding
        would produce it) under the methods."""
        self.check(task, images)
        ctx_inputs, cont = self.encode_pair(images, context, continuation, raw)
        return self.score(task, doc_id, ctx_inputs, cont)

    def encode_pair(self, images: list, context: str, continuation: str, raw: bool) -> tuple[Inputs, torch.Tensor]:
        """The context's Inputs and the continuation's ids. Raw text: tokenised as lm-eval's HF model
        does (the pair together, the context's tokens cut off; trailing spaces move to the
        continuation); a chat prompt: the continuation's own tokens after the template."""
        tok = self.bundle.tokenizer
        if raw:
            n_space = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - n_space], context[len(context) - n_space:] + continuation
            whole = tok(context + continuation, return_tensors="pt").input_ids
            n_ctx = tok(context, return_tensors="pt").input_ids.shape[1]
            return Inputs(whole[:, :n_ctx].to(self.bundle.model.device)), whole[0, n_ctx:]
        inputs = self.bundle.encode(self._sample(images, context, False))
        cont = tok(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return inputs, cont

    def score(self, task: str, doc_id, inputs: Inputs, cont: torch.Tensor) -> tuple[float, bool]:
        """Teacher-forced log-likelihood of ``cont`` (m,) over the methods' prefill of ``inputs``."""
        if cont.numel() == 0:
            raise MethodError(f"task {task!r}: empty continuation for doc {doc_id}; nothing to score")
        p = engine.prefill(self.bundle, inputs, self.methods)
        cont = cont.to(p.logits.device)
        logits = p.logits[-1:]
        if cont.numel() > 1:
            logits = torch.cat([logits, engine.continuation(self.bundle, p, self.methods, cont[None, :-1])])
        logp = torch.log_softmax(logits.float(), dim=-1)
        total = float(logp.gather(1, cont[:, None]).sum())
        greedy = bool((logits.argmax(-1) == cont).all())
        p.trace.answer_ids = cont.tolist()
        self.costs.add(task, doc_id, p.trace, kind="loglikelihood")
        return total, greedy

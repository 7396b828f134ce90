"""The lm-evaluation-harness model ``mmlab``: a text LM under any method spec (weight / activation
quantization, KV eviction / merging / quantization) on lm-eval's tasks.

lm-eval has no plugin entry point, so the name is registered when this module is imported:
``python -m mmlab.bench.lm_model run --model mmlab --model_args pretrained=smollm2-135m,methods="gptq(bits=3)"
--tasks piqa,arc_easy`` (lm-eval's own command line, with the model registered), or
``mmlab.bench.lm_eval(...)`` from Python.

``loglikelihood`` prefills the context under the methods and scores the continuation over that cache
(``Server.score``); ``loglikelihood_rolling`` (WikiText perplexity) does the same per lm-eval rolling
window of ``max_length`` tokens (2048 as the LLaMA3 low-bit study); ``generate_until`` is greedy.
model_args: ``pretrained``, ``methods``, ``dtype``, ``device``, ``attn_implementation``,
``max_length``, ``max_new_tokens``, ``costs`` (sidecar JSON, default ``mmlab_costs_<time>.json``
next to ``--output_path`` or in the working directory).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from mmlab.arch import Inputs
from mmlab.bench.costs import sidecar_path
from mmlab.bench.serve import Server
from mmlab.methods.base import MethodError
from mmlab.models import Bundle

ARGS = ("pretrained", "methods", "dtype", "device", "attn_implementation", "max_length", "max_new_tokens", "costs",
        "batch_size", "max_batch_size")


@register_model("mmlab")
class MMLabLM(LM):
    def __init__(self, pretrained: str | Bundle = "smollm2-135m", methods: str = "", dtype: str | None = None,
                 device: str | None = None, attn_implementation: str | None = None, max_length: int = 2048,
                 max_new_tokens: int | None = None, costs: str | None = None, batch_size=1, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise MethodError(f"mmlab model_args: unknown {', '.join(sorted(unknown))}; valid: {', '.join(ARGS)}")
        self.server = Server.open(pretrained, methods, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation, max_new_tokens=max_new_tokens)
        self.max_length = int(max_length)
        self.costs_path = sidecar_path(costs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "device"}
        if (additional_config or {}).get("device") and "device" not in args:
            args["device"] = additional_config["device"]
        return cls(**args, **extra)

    @property
    def bundle(self) -> Bundle:
        return self.server.bundle

    @staticmethod
    def _task(req) -> str:
        return getattr(req, "task_name", None) or "lm_eval"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        with self.server.session():
            for req in tqdm(requests, desc="mmlab scoring", disable=disable_tqdm or len(requests) < 2):
                context, continuation = req.args
                out.append(self.server.loglikelihood(self._task(req), req.doc_id, [], context, continuation,
                                                     raw=True))
        self.server.costs.write(self.costs_path)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tok, out = self.bundle.tokenizer, []
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        with self.server.session():
            for req in tqdm(requests, desc="mmlab rolling", disable=disable_tqdm or len(requests) < 2):
                (text,) = req.args
                ids = tok(text, add_special_tokens=False).input_ids
                total = 0.0
                for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                        ids, prefix, self.max_length, 1)):
                    device = self.bundle.model.device
                    inputs = Inputs(torch.tensor([ctx], device=device))
                    total += self.server.score(self._task(req), req.doc_id, inputs, torch.tensor(pred))[0]
                out.append(total)
        self.server.costs.write(self.costs_path)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        with self.server.session():
            for req in tqdm(requests, desc="mmlab answering", disable=disable_tqdm or len(requests) < 2):
                context, gen_kwargs = req.args
                until = gen_kwargs.get("until") or []
                text, _ = self.server.generate(self._task(req), req.doc_id, [], context,
                                               max_new_tokens=gen_kwargs.get("max_gen_toks"),
                                               until=[until] if isinstance(until, str) else list(until), raw=True)
                out.append(text)
        self.server.costs.write(self.costs_path)
        return out


def main() -> None:
    """lm-eval's command line with the ``mmlab`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

"""mmlab: a Jupyter-first workbench for efficient multimodal LLM inference.

    import mmlab
    b = mmlab.load("tiny-llava")
    samples = mmlab.data.shapes(n=200, seed=0, split="test")
    m = mmlab.methods.get("random", keep_ratio=0.25)
    trace = mmlab.run(b, samples[0], methods=[m])
    res = mmlab.evaluate(b, samples, methods=[m])
"""

import logging

# torchao (optional real kernels) logs every GPU-only extension it cannot load on a CPU machine
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from mmlab import data, figures, methods  # noqa: E402
from mmlab.engine import prefill, run  # noqa: E402
from mmlab.evaluate import arank, evaluate, method_grid, perplexity, perplexity_grid, quant_grid  # noqa: E402
from mmlab.methods.base import MethodError  # noqa: E402
from mmlab.models import Bundle, load  # noqa: E402
from mmlab.recording import record, record_rows  # noqa: E402
from mmlab.trace import Trace  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Bundle", "MethodError", "Trace", "arank", "data", "evaluate", "figures", "load", "method_grid", "methods",
           "perplexity", "perplexity_grid", "prefill", "quant_grid", "record", "record_rows", "run"]

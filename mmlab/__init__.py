"""mmlab: a Jupyter-first workbench for efficient multimodal LLM inference.

    import mmlab
    b = mmlab.load("tiny-llava")
    samples = mmlab.data.shapes(n=200, seed=0, split="test")
    m = mmlab.methods.get("random", keep_ratio=0.25)
    trace = mmlab.run(b, samples[0], methods=[m])
    res = mmlab.evaluate(b, samples, methods=[m])
"""

from mmlab import data, figures, methods
from mmlab.engine import prefill, run
from mmlab.evaluate import arank, evaluate, method_grid, perplexity, perplexity_grid
from mmlab.methods.base import MethodError
from mmlab.models import Bundle, load
from mmlab.recording import record, record_rows
from mmlab.trace import Trace

__version__ = "0.1.0"
__all__ = ["Bundle", "MethodError", "Trace", "arank", "data", "evaluate", "figures", "load", "method_grid", "methods",
           "perplexity", "perplexity_grid", "prefill", "record", "record_rows", "run"]

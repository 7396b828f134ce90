"""mmlab: a Jupyter-first workbench for efficient multimodal LLM inference.

    import mmlab
    b = mmlab.load("tiny-llava")
    samples = mmlab.data.shapes(n=200, seed=0, split="test")
    m = mmlab.methods.get("random", keep_ratio=0.25)
    trace = mmlab.run(b, samples[0], methods=[m])
    res = mmlab.evaluate(b, samples, methods=[m])

Module order (``MODULE_ORDER``): a module imports only modules of earlier layers (or its
own layer's package base); imports point one way and never in a circle
(``tests/test_imports.py`` checks both, imports inside functions included)::

    data, threads, cluster    shapes VQA, offline text (perplexity, calibration, out-of-domain prose);
                              threads that follow the sweep runner; sweep runs as Dask tasks (leaves)
    methods.base              the typed stage interface, registry (torch only)
    methods.*                 one file per family                 (methods.base + torch only)
    flops, trace              a run's FLOPs, and what it did
    arch                      one adapter per architecture family (registry by model_type; the embedded VLMs by name)
    models                    load(name) -> Bundle (model + tokenizer + adapter)
    engine                    prefill / decode loop and its stages (methods only through base)
    quantize                  weight methods and activation quantizers (both calibrated once per
                              model), swapped / hooked in *around* the engine (calibration uses it)
    evaluate                  run / prefill with the swap, evaluate, perplexity, grid, generation
    recording, figures        mmlab.record, figures with provenance
    viz                       drawings read from Traces
    explorer                  the ipywidgets explorer: run A beside run B, a view per family
    bench                     lmms-eval / lm-eval models over the engine, answer costs, mmlab's lmms-eval tasks
                              (imports its harness only when used; ``import mmlab`` never does)
    report, batch, testing    report figures / tables from collected sweeps, sweeps, tiny random models
    tiny                      embedded-model training (tiny-llava from scratch; smol-llava around the real SmolLM2;
                              the trained MoD, Dynamic-LLaVA and DPN variants)
    cli                       the command line
"""

import importlib
import logging
import sys
import types

# torchao (optional real kernels) logs every GPU-only extension it cannot load on a CPU machine
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

# The public surface, loaded on first use: ``import mmlab`` (and ``mmlab --help``) does not import torch.
_PUBLIC = {"Inputs": "mmlab.arch", "MethodError": "mmlab.methods.base", "Bundle": "mmlab.models",
           "load": "mmlab.models", "record": "mmlab.recording", "record_rows": "mmlab.recording",
           "Trace": "mmlab.trace",
           **{name: "mmlab.evaluate" for name in ("arank", "generation", "grid", "knob_points", "perplexity", "prefill",
                                                   "run", "visual_heads")}}
_SUBPACKAGES = ("data", "figures", "methods")


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name in _PUBLIC:
            value = getattr(importlib.import_module(_PUBLIC[name]), name)
        elif name in _SUBPACKAGES:
            value = importlib.import_module(f"mmlab.{name}")
        else:
            raise AttributeError(f"module 'mmlab' has no attribute {name!r}")
        self.__dict__[name] = value
        return value

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))

    # ``mmlab.evaluate`` is the function, although a submodule has that name: importing the submodule
    # sets this attribute, which the setter ignores
    evaluate = property(lambda self: importlib.import_module("mmlab.evaluate").evaluate, lambda self, value: None)


sys.modules[__name__].__class__ = _Package

MODULE_ORDER = [
    ["data", "threads", "cluster"],
    ["methods.base"],
    ["methods"],
    ["flops"],
    ["trace"],
    ["arch"],
    ["models"],
    ["engine"],
    ["quantize"],
    ["evaluate"],
    ["recording", "figures"],
    ["viz"],
    ["explorer"],
    ["bench"],
    ["report", "batch", "testing"],
    ["tiny"],
    ["cli"],
]

__version__ = "0.1.0"
__all__ = ["Bundle", "Inputs", "MethodError", "Trace", "arank", "data", "evaluate", "figures", "generation", "grid",
           "knob_points", "load", "methods", "perplexity", "prefill", "record", "record_rows", "run", "visual_heads"]

"""One adapter per architecture family, found by the config's ``model_type`` (see ``base.py``).

| adapter | model types | file |
| --- | --- | --- |
| causal_lm | llama (SmolLM2), mistral, qwen2, qwen3 | causal_lm.py |
| gemma3_text | gemma3_text | gemma3.py |
| llava | llava (LLaVA-1.5) | llava.py |
| llava_next | llava_next, llava_onevision | llava_next.py |
| qwen2_vl | qwen2_vl, qwen2_5_vl | qwen2_vl.py |
| tiny-llava | (by name: the embedded model) | tiny_llava.py |
| smol-llava | (by name: SmolLM2-135M + mmlab's vision tower) | smol_llava.py |
"""

from mmlab.arch import causal_lm, gemma3, llava, llava_next, qwen2_vl, smol_llava, tiny_llava  # noqa: F401  (register)
from mmlab.arch.base import Adapter, Inputs, Prompt, adapter_class, register, supported_model_types

__all__ = ["Adapter", "Inputs", "Prompt", "adapter_class", "register", "supported_model_types"]

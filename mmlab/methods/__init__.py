"""Registered methods. ``available()`` lists names; ``get(name, **params)`` builds one; ``knob(name)``
is the parameter a sweep varies; ``defaults(name)`` its parameters and their defaults."""

from mmlab.methods import kv_cache, mod, quant, token_pruning  # noqa: F401  (register their methods)
from mmlab.methods.base import Method, MethodError, available, defaults, get, knob, method_class, parse, register, spec

__all__ = ["Method", "MethodError", "available", "defaults", "get", "knob", "method_class", "parse", "register", "spec"]

"""Registered methods. ``available()`` lists names; ``get(name, **params)`` builds one; ``knob(name)``
is the parameter a sweep varies; ``defaults(name)`` its parameters and their defaults. Importing this
package registers every family's methods: modules that look methods up by name import from here."""

from mmlab.methods import kv_cache, mod, quant, token_pruning  # noqa: F401  (register their methods)
from mmlab.methods.base import (
    Method,
    MethodError,
    as_methods,
    available,
    defaults,
    get,
    knob,
    method_class,
    needs_swap,
    parse,
    register,
    spec,
)

__all__ = ["Method", "MethodError", "as_methods", "available", "defaults", "get", "knob", "method_class", "needs_swap",
           "parse", "register", "spec"]

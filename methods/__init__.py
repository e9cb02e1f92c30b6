"""The methods, one file each, and their registry (methods/registry.py; docs/methods.md adds one).

    from methods import create_model, get_method, method_names
"""
from methods.registry import (Method, add_own_options, create_model, get_method, method_names, option_defaults, option_owners,
                              register_method, with_defaults)
from methods import acnet, acnet_extractor, clipprompt, msedge  # noqa: E402,F401  (each registers itself)

__all__ = ['Method', 'add_own_options', 'create_model', 'get_method', 'method_names', 'option_defaults', 'option_owners',
           'register_method', 'with_defaults']

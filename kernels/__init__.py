"""Triton kernels and their thin launchers (installed as ``fastlora.kernels``).

Imports neither ``fastlora.nn`` nor ``peft``. Launchers take 2-D tensors of any strides.
One kernel per stage (shrink, linear, dy, dA), for one adapter and, with a ``MULTI``
flag, for batches whose rows use different adapters (``multi_meta``).
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a fastlora checkout is on sys.path (``python -m`` or
    # ``python -c`` from its root, PYTHONPATH=checkout), and that name belongs to another package
    # (Hugging Face's kernel hub, which transformers and bitsandbytes import). Hand the name over
    # to the installed package of that name, searched for on sys.path without the checkout; with
    # none installed, leave what Python makes of a folder without ``__init__.py``: an empty
    # namespace package (no ``__file__``, no ``__version__``, no submodules), which is how
    # transformers' availability checks recognize a shadowing folder. tests/test_shadowing.py.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns this entry, not this file
        _spec.loader.exec_module(_module)
    else:
        _module = type(_sys)("kernels", "No package named 'kernels' is installed.")
        _module.__spec__ = _machinery.ModuleSpec("kernels", None, is_package=True)
        _module.__spec__.submodule_search_locations = _module.__path__ = []

        def _missing(name, _root=_root):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: no package named 'kernels' is "
                f"installed, and {_root}/kernels is fastlora's kernel folder (fastlora.kernels)")

        _module.__getattr__ = _missing
        _sys.modules["kernels"] = _module
else:
    from .backward import DoraBackward, lora_da, lora_dy, multi_lora_da, multi_lora_dy
    from .dequant4 import dequantize4
    from .descriptors import BankTerm, DoraBank, Quant4, Term, bank_term, dora_bank, term
    from .dora import dora_norm
    from .dropout import dropout_mask
    from .linear import cublas_linear, cublas_unsupported, fused_linear, multi_fused_linear
    from .linear_tma import tma_layout_unsupported, tma_linear, tma_unsupported
    from .multi_meta import GATHER_MAX_M, PackedAdapters, RowGroups, RowMap, group_rows
    from .shrink import lora_shrink, multi_lora_shrink

    __all__ = ["GATHER_MAX_M", "BankTerm", "DoraBackward", "DoraBank", "PackedAdapters",
               "Quant4", "RowGroups", "RowMap", "Term", "bank_term", "cublas_linear",
               "cublas_unsupported", "dequantize4", "dora_bank", "dora_norm", "dropout_mask",
               "fused_linear",
               "group_rows", "lora_da", "lora_dy", "lora_shrink", "multi_fused_linear",
               "multi_lora_da", "multi_lora_dy", "multi_lora_shrink", "term",
               "tma_layout_unsupported", "tma_linear", "tma_unsupported"]

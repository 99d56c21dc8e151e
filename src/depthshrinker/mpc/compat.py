"""The one compatibility layer between CrypTen 0.4.1 and current torch/numpy (REFERENCE.md §2).

CrypTen 0.4.1 imports ``torch.onnx._internal.registration``, which torch >= 2.9 moved to
``torch.onnx._internal.torchscript_exporter.registration``; the old name is aliased in ``sys.modules``
before CrypTen is imported. Nothing else is needed: this package never goes through CrypTen's ONNX
converter (``engine`` mirrors each layer with CrypTen's own ops), and its numpy use works on numpy 2.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

INSTALL_HINT = ("install with: pip install --no-deps crypten==0.4.1 && pip install omegaconf onnx pandas pyyaml "
                "future scipy scikit-learn  (or: pip install -e '.[mpc]' then the --no-deps line)")
MOVED_MODULES = {"torch.onnx._internal.registration": "torch.onnx._internal.torchscript_exporter.registration"}


class MPCError(RuntimeError):
    """A secure-inference run failed; the message says which party or step, in one line."""


def _alias_moved_modules() -> None:
    for old, new in MOVED_MODULES.items():
        if old in sys.modules:
            continue
        try:
            importlib.import_module(old)
        except ModuleNotFoundError:
            sys.modules[old] = importlib.import_module(new)


def import_crypten() -> ModuleType:
    """``import crypten`` on current torch, or an MPCError that says how to install it."""
    if importlib.util.find_spec("crypten") is None:
        raise MPCError(f"CrypTen is not installed; {INSTALL_HINT}")
    _alias_moved_modules()
    try:
        import crypten
    except ImportError as err:
        raise MPCError(f"CrypTen 0.4.1 failed to import ({err}); {INSTALL_HINT}") from None
    return crypten

"""The one compatibility layer between CrypTen 0.4.1 and current torch/numpy (REFERENCE.md §2).

What it fixes: CrypTen 0.4.1 imports ``torch.onnx._internal.registration``, which torch >= 2.9 moved to
``torch.onnx._internal.torchscript_exporter.registration``; the old name is aliased in ``sys.modules`` before
CrypTen is imported.

The CrypTen paths this project uses, all checked by tests/test_mpc.py on torch 2.14 / numpy 2 and needing
nothing else: ``crypten.init``/``uninit`` with the gloo ``DistributedCommunicator`` over a ``file://`` rendezvous,
with and without the trusted-third-party world (``init_ttp``: 2 parties + dealer); ``cryptensor`` sharing,
``conv2d``/``matmul``/``relu``/``hardtanh``/``mean``/``index_select``/``index_add``/``get_plain_text``; the TFP and
TTP providers (``TTPClient``, ``TTPServer``'s generator setup and tuple functions; ``send_obj``/``recv_obj``,
whose ``restricted_loads`` accepts the request dicts and ``torch.Size`` replies); the in-memory tuple cache
(``trace``, ``fill_cache``, ``request_cache``/``tuple_cache``); the communication counters (``verbose``).

What it does NOT cover (unused here, and broken or untested on torch >= 2.6): ``crypten.save``, ``crypten.load``,
``save_from_party``, ``load_from_party`` and the providers' ``save_cache``/``load_cache`` (the tuple cache on disk)
call ``torch.load`` without ``weights_only`` (True by default since torch 2.6), so they read back only what torch's
allow-list accepts (not pickled CrypTensors); nothing here patches them;
``crypten.nn.from_pytorch``/``from_onnx`` (the ONNX converter: needs the legacy exporter and lacks ``Identity``);
``crypten.mpc.run_multiprocess`` (fork-based; ``engine`` starts its own processes); the in-process (thread)
communicator, the homomorphic (HE) provider, active security and CUDA.
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

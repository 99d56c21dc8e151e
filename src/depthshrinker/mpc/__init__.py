"""Private two-party inference: the CrypTen engine that measures a PlainNet's secure-inference latency,
bytes and rounds, and the closed-form cost model calibrated to it. CrypTen is imported only when a
measurement runs (``compat.import_crypten``); the cost model needs no CrypTen."""
from .compat import MPCError, import_crypten
from .cost import NETWORKS, Cost, Network, block_cost, count, estimate, unit_table
from .engine import as_plain, bench_mpc, measure, measure_many

__all__ = ["MPCError", "import_crypten", "NETWORKS", "Cost", "Network", "block_cost", "count", "estimate",
           "unit_table", "as_plain", "bench_mpc", "measure", "measure_many"]

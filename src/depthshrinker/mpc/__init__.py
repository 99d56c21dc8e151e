"""Private two-party inference: the CrypTen engine that measures a PlainNet's secure inference (model owner,
client and a separate dealer process; online and preprocessing phases) and the closed-form cost model that
predicts both phases' bytes and rounds exactly. CrypTen is imported only when a measurement runs
(``compat.import_crypten``); the cost model needs no CrypTen."""
from .compat import MPCError, import_crypten
from .cost import NETWORKS, Cost, Network, block_cost, count, estimate, latency, merged_conv, preproc_latency, \
    unit_table
from .engine import PROVIDERS, as_plain, bench_mpc, measure, measure_many

__all__ = ["MPCError", "import_crypten", "NETWORKS", "Cost", "Network", "block_cost", "count", "estimate",
           "latency", "merged_conv", "preproc_latency", "unit_table", "PROVIDERS", "as_plain", "bench_mpc",
           "measure", "measure_many"]

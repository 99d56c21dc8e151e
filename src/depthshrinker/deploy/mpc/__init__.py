"""Private two-party inference: the CrypTen engine (``engine``) that measures a PlainNet's secure inference (model
owner, client and a separate dealer process; online and preprocessing phases) and the closed-form cost model
(``cost``) that predicts both phases' bytes and rounds exactly. CrypTen is imported only when a measurement runs
(``compat.import_crypten``); the cost model needs no CrypTen. Nothing is re-exported here, so that importing the
cost model never loads the engine."""

"""DepthShrinker: remove activation functions of compact CNNs and merge the convolutions they separated,
for faster GPU inference and cheaper two-party (MPC) private inference."""

__version__ = "0.1.0"

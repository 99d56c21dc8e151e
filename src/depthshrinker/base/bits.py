"""Binary masks as text: base64 of the packed bits (row-major), for mask JSON files and network specs."""
from __future__ import annotations

import base64

import numpy as np
import torch


def encode_bits(mask: torch.Tensor) -> str:
    return base64.b64encode(np.packbits(mask.detach().cpu().flatten().bool().numpy()).tobytes()).decode()


def decode_bits(text: str, shape: list[int]) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[: int(np.prod(shape))]
    return torch.tensor(bits, dtype=torch.float32).view(*shape)

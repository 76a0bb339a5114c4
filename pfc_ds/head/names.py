"""The names users give the head's choices, in one place: the config, the head and the memory
model all check against these."""

from __future__ import annotations

import torch

BANKS = ("device", "host", "disk")  # where the centres and their optimizer states live
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {name: torch.empty((), dtype=t).element_size() for name, t in DTYPES.items()}


def dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of ``fp32``/``fp16``/``bf16`` (``None`` stays ``None``)."""
    return None if name is None else DTYPES[name]

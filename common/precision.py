"""`run.amp`: the autocast dtype of each setting, shared by the trainer (autocast) and the loaders (the dtype
batches arrive in)."""
from typing import Optional

import torch

from common.errors import RuntimeConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_SETTINGS = ("auto", *AMP_DTYPES)  # auto: bf16 on CUDA, off elsewhere


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype `amp` means on `device`; None for fp32."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise RuntimeConfigError("run.amp=fp16 needs CUDA (use bf16 or off on CPU)")
    return AMP_DTYPES[amp]

"""Backbone forward precision: "fp32" (default, exact), or opt-in "bf16" / "fp16" (reduced precision).

"fp32" is the exact path (bit-identical keys, seeds and boxes to the reference on CPU; see README
"Exactness"). "bf16" and "fp16" run the forward under ``torch.autocast`` (and fused SDPA attention):
their features, seeds and boxes are *not* bit-identical; report their agreement with fp32 instead.

On a CPU, bf16 only pays off with native bf16 units (AVX-512 BF16 or AMX); without them the forward
is several times slower than float32 (measured 5.5x at 384x512 and 6.9x at 224x224 for ViT-S/16, one
thread, AVX2, torch 2.14.1; the issue reports up to ~12x), so it is refused unless forced.
fp16 on a CPU is always refused (no fast fp16 kernels, and no accuracy gain).
"""
from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 arithmetic units (AVX-512 BF16 or AMX-BF16).

    ``torch.backends.cpu.get_cpu_capability()`` only says "AVX512"/"AMX" (the latter implies bf16);
    AVX-512 alone does not, so the kernel's CPU flags decide (Linux ``/proc/cpuinfo``)."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in cap:
        return True
    return any(f in _cpu_flags() for f in _NATIVE_BF16_FLAGS)


def check_precision(precision: str, device: torch.device | str, force: bool = False) -> str:
    """Validate ``precision`` for ``device``; return it, or raise ValueError saying what to do."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown backbone precision {precision!r}; choose one of {PRECISIONS} (precision=...)")
    dev = torch.device(device)
    if precision == "fp32":
        return precision
    if dev.type == "cpu":
        if precision == "fp16":
            raise ValueError("precision=fp16 is not supported on a CPU (no fast float16 kernels); "
                             "use fp32, or bf16 on a CPU with native bf16 units, or fp16 on a GPU")
        if not cpu_has_native_bf16() and not force:
            raise ValueError(
                "precision=bf16 on this CPU is about 5-12x slower than float32 (no native bf16 units: "
                f"capability {torch.backends.cpu.get_cpu_capability()}, no avx512_bf16/amx_bf16); use fp32 or "
                "a GPU (force_precision=True runs it anyway)")
    elif dev.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision=bf16: this GPU has no bf16 support; use fp16 or fp32")
    return precision


def forward_context(precision: str, device: torch.device):
    """The context a forward runs in: autocast for bf16/fp16; for fp32 on CUDA, TF32 switched off
    (cuDNN convolutions default to TF32, which would silently lower the patch embedding's precision)."""
    if precision == "fp32":
        if device.type == "cuda":
            return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])

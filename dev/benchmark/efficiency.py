"""How close the network runs to the machine's limit: its multiply-adds (fvcore's count) and the
GMAC/s of a large float32 matrix multiply with the same threads, measured in the same run."""

import logging
import time
from typing import Dict, List

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from .timing import synchronize

__all__ = ["gmac", "matmul_peak_gmac_per_s", "network_efficiency"]


def gmac(module: nn.Module, *inputs) -> float:
    """Multiply-adds of ``module(*inputs)`` in GMAC, as fvcore counts them (one per conv or
    matmul multiply-add; norms, activations and resizes are counted or skipped as fvcore does)."""
    count = FlopCountAnalysis(module, inputs)
    count.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    return count.total() / 1e9


def matmul_peak_gmac_per_s(device: torch.device, n: int = 4096, repeats: int = 3) -> float:
    """The machine's practical float32 peak: GMAC/s of an n x n x n matrix multiply (the best of
    ``repeats`` runs after one warm-up), with torch's current threads."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return n**3 / 1e9 / best


def network_efficiency(
    parts: Dict[str, float], seconds: Dict[str, float], device: torch.device, n: int = 4096
) -> Dict[str, float]:
    """The network's GMAC, its GMAC/s over the measured median times of its parts, and that
    rate as a fraction of :func:`matmul_peak_gmac_per_s`.

    Args:
        parts: GMAC of each part of the network (e.g. backbone_fpn, instance_branch, ...).
        seconds: median seconds of the same parts.
        n: size of the peak's matrix multiply.
    """
    missing: List[str] = [k for k in parts if k not in seconds]
    if missing:
        raise ValueError(f"no time measured for the network parts {missing}")
    total, time_s = sum(parts.values()), sum(seconds[k] for k in parts)
    peak = matmul_peak_gmac_per_s(device, n)
    out = {f"{k}_gmac": round(v, 2) for k, v in parts.items()}
    out.update(
        network_gmac=round(total, 2),
        network_gmac_per_s=round(total / time_s, 2),
        matmul_peak_gmac_per_s=round(peak, 2),
        fraction_of_peak=round(total / time_s / peak, 3),
    )
    out.update({f"{k}_gmac_per_s": round(parts[k] / seconds[k], 2) for k in parts})
    return out

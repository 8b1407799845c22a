"""RRAM cells and their errors (SPEC section 4, step 5).

A signed weight slice s (|s| < 2^c) is stored on a differential pair of cells: the positive cell holds
level max(s, 0), the negative cell level max(-s, 0). A level d has conductance G(d) = d + g0 in level
units, g0 = (2^c - 1) / (R - 1) being G_min (the off-state leak). The column current of a weight is
G_pos - G_neg, so without errors the leaks cancel and the pair reads exactly s.

Errors, per cell and independent:
- state_dependent: G * (1 + N(0, vari))
- state_independent: G + N(0, ind_vari)
- laplace: G * (1 + Laplace(0, laplace_b))
- stuck-at faults: the cell reads G_min (SA0, probability p) or G_max (SA1, probability p).

A chip is one draw of all of these; `chip_generator` turns (seed, chip, layer) into the random stream,
so the same seed gives the same chip, and every hardware point of one chip index sees the same
underlying standard draws (common random numbers make the comparison of points less noisy).
"""

from __future__ import annotations

import numpy as np
import torch

from nipa.hardware.compat import NO_COMPAT, Compat
from nipa.hardware.config import HWConfig


def leak_level(cell_bits: int, onoffratio: float) -> float:
    """g0 = G_min in level units: the top level 2^c - 1 sits at G_max = R * G_min."""
    return (2**cell_bits - 1) / (onoffratio - 1)


def chip_generator(seed: int, chip: int, layer_index: int, device: str | torch.device = "cpu",
                   *stream: int) -> torch.Generator:
    """An independent, reproducible random stream for one layer of one chip (and, for per-read device
    error, one `stream` such as (forward call, input bit))."""
    mixed = np.random.SeedSequence([seed, chip, layer_index, *stream]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def _laplace(shape: torch.Size, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Standard Laplace(0, 1) draws by inverse transform."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype) - 0.5
    return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-7))


def perturb_conductance(
    conductance: torch.Tensor, hw: HWConfig, generator: torch.Generator, compat: Compat = NO_COMPAT,
    fault_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply variation and stuck-at faults of `hw` to cell conductances (level units). With
    `compat.original_faults` a stuck-at-1 cell reads sign(value) and a stuck-at-0 cell 1/onoffratio (the
    original's rule); with `compat.signed_cells` the cells are signed and have no leak, so stuck-at-0 reads
    0 and stuck-at-1 reads sign(value) * (2^c - 1). The fault masks come from `fault_generator` when
    given (per-read variation: faults are permanent, so their masks stay those of the chip)."""
    device, dtype = conductance.device, conductance.dtype
    shape = conductance.shape
    spread = hw.device_spread
    if spread > 0:
        if hw.vari_type == "state_dependent":
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            conductance = conductance * (1 + spread * noise)
        elif hw.vari_type == "laplace":
            conductance = conductance * (1 + spread * _laplace(shape, generator, device, dtype))
        else:  # state_independent
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            conductance = conductance + spread * noise
    if hw.SAF_prop > 0:
        ideal_sign = torch.sign(conductance)  # after variation, as the original
        if compat.original_faults:
            stuck_low, stuck_high_value = torch.full_like(conductance, 1 / hw.onoffratio), ideal_sign
        elif compat.signed_cells:
            stuck_low, stuck_high_value = torch.zeros_like(conductance), ideal_sign * (2**hw.cellBit - 1)
        else:
            g_min = leak_level(hw.cellBit, hw.onoffratio)
            stuck_low = torch.full_like(conductance, g_min)
            stuck_high_value = torch.full_like(conductance, (2**hw.cellBit - 1) + g_min)
        uniform = torch.rand(shape, generator=fault_generator or generator, device=device, dtype=dtype)
        conductance = torch.where(uniform < hw.SAF_prop, stuck_low, conductance)
        stuck_high = (uniform >= hw.SAF_prop) & (uniform < 2 * hw.SAF_prop)
        conductance = torch.where(stuck_high, stuck_high_value, conductance)
    return conductance


def program_pairs(slices: torch.Tensor, hw: HWConfig, generator: torch.Generator | None,
                  compat: Compat = NO_COMPAT, fault_generator: torch.Generator | None = None) -> torch.Tensor:
    """Signed slice values -> the differential read G_pos - G_neg of each cell pair (or, with
    `compat.signed_cells`, the read of one signed cell per slice, as the original tool modelled it).

    Without device error this returns the slices themselves (the leaks cancel exactly).
    """
    if not hw.has_device_error or generator is None:
        return slices
    if compat.signed_cells:
        return perturb_conductance(slices, hw, generator, compat, fault_generator)
    g0 = 0.0 if compat.original_faults else leak_level(hw.cellBit, hw.onoffratio)
    positive = perturb_conductance(slices.clamp(min=0) + g0, hw, generator, compat, fault_generator)
    negative = perturb_conductance((-slices).clamp(min=0) + g0, hw, generator, compat, fault_generator)
    return positive - negative

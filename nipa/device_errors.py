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

from nipa.config import HWConfig


def leak_level(cell_bits: int, onoffratio: float) -> float:
    """g0 = G_min in level units: the top level 2^c - 1 sits at G_max = R * G_min."""
    return (2**cell_bits - 1) / (onoffratio - 1)


def chip_generator(seed: int, chip: int, layer_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """An independent, reproducible random stream for one layer of one chip."""
    mixed = np.random.SeedSequence([seed, chip, layer_index]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def _laplace(shape: torch.Size, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Standard Laplace(0, 1) draws by inverse transform."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype) - 0.5
    return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-7))


def perturb_conductance(
    conductance: torch.Tensor, hw: HWConfig, generator: torch.Generator
) -> torch.Tensor:
    """Apply variation and stuck-at faults of `hw` to cell conductances (level units)."""
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
        g_min = leak_level(hw.cellBit, hw.onoffratio)
        g_max = (2**hw.cellBit - 1) + g_min
        uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        conductance = torch.where(uniform < hw.SAF_prop, torch.full_like(conductance, g_min), conductance)
        stuck_high = (uniform >= hw.SAF_prop) & (uniform < 2 * hw.SAF_prop)
        conductance = torch.where(stuck_high, torch.full_like(conductance, g_max), conductance)
    return conductance


def program_pairs(slices: torch.Tensor, hw: HWConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Signed slice values -> the differential read G_pos - G_neg of each cell pair.

    Without device error this returns the slices themselves (the leaks cancel exactly).
    """
    if not hw.has_device_error or generator is None:
        return slices
    g0 = leak_level(hw.cellBit, hw.onoffratio)
    positive = perturb_conductance(slices.clamp(min=0) + g0, hw, generator)
    negative = perturb_conductance((-slices).clamp(min=0) + g0, hw, generator)
    return positive - negative

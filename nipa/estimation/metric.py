"""The NIPA metric (SPEC section 6): a hardware point's robustness from the weights' bit statistics.

Every error is expressed as equivalent independent noise on one integer weight, in LSB^2, and NIPA is
the weight's signal power over that noise:

    NIPA = sum_k 4^(c k) var_k / ( Q + sum_k 4^(c k) (ADC_k + sigma_dev,k^2 A_k) )

with slice k = 0..K-1 (0 least significant), c = cellBit, and

- Q = 3 sigma_w^2 / (s^2 2^(2b)), s = 6 sigma_w / 2^b: the weight rounding noise, = 1/12;
- ADC_k = k_T S density_k^2 / (12 * 2^(2 a_r)): the ADC step S density_k / 2^a_r, its rounding
  noise step^2 / 12, divided by the S rows that share it, times k_T = T, the number of tiles whose ADC
  reads add into one output (SPEC: "k_T accounts for the T tiles"; ``tile_factor="one"`` sets k_T = 1);
- sigma_dev,k^2, the per-cell device error: state_dependent vari^2 var_k, laplace 2 laplace_b^2 var_k
  (the variance of Laplace(0, b) is 2 b^2), state_independent ind_vari^2; with stuck-at faults of
  probability p (each of SA0 and SA1) it becomes 2p var_k + (1 - 2p) sigma_dev,k^2, as the SPEC writes
  it (a faulty cell's error counted as var_k, a healthy one's as the variation);
- A_k = max(0, 1 - E[X^2 1{|X| < Delta/2}] / v), X ~ N(0, v), v = S sigma_dev,k^2,
  Delta = S density_k / 2^a_r: the share of a column's device error that the ADC rounding does not
  absorb. In closed form, with u = Delta / (2 sqrt(v)):
  E[X^2 1{|X| < a}] = v (erf(a / sqrt(2v)) - sqrt(2/pi) (a / sqrt(v)) exp(-a^2 / (2v))), so
  A_k = erfc(u / sqrt 2) + sqrt(2/pi) u exp(-u^2 / 2), which lies in [0, 1] and falls as u grows.
  Where sigma_dev,k = 0 the device term is 0 whatever A_k (taken as 0 there).

Reductions over layers:
- ``"model_average"`` (default, the published form): the statistics are first averaged over the mapped
  layers (var_k, density_k and T), then put into the formula once;
- ``"layer_sum"``: every layer's signal and noise from its own statistics, then total signal over
  total noise (sum_l signal_l / sum_l noise_l), a harmonic-like combination in which the noisiest
  layers weigh most. Each layer's terms are first divided by its full-scale weight (2^(b-1) - 1)^2, which
  cancels when every layer has the same wl_weight and makes layers of other weight bits comparable.
  It is the reduction of per-layer points (`nipa.hardware.config.PerLayerConfig`: every layer at its own effective
  point); "model_average" refuses them.
`per_layer_nipa` gives one NIPA per layer: lower NIPA = the layer is more sensitive to the hardware's
errors (it keeps less signal over its noise), so sorting ascending ranks layers from most to least
sensitive.

Everything is vectorized with numpy over hardware points (and layers): the core, `nipa_terms`, takes
arrays; `nipa_metric` groups hardware points by their statistics combination and calls it once.
The metric does not depend on wl_input or onoffratio.

Choices where the published form leaves room (see also nipa/estimation/stats.py on zero padding):
- k_T = T by default, as the SPEC says. Note that with per-row statistics a per-weight derivation
  (T reads of noise step^2/12 per output, shared by the T*S rows of the output) gives k_T = 1; with
  k_T = T the ADC term is about fan_in density^2 / (12 4^a_r), nearly independent of S. Offered as
  ``tile_factor="one"`` so the two can be compared against the ground truth.
- Model level: the mean of T over layers serves as k_T, and the mean density_k enters squared (not
  the mean of density_k^2), i.e. the averaged statistics are used exactly as if they were one layer's.
- The stuck-at mixture is kept as written although a stuck-at-1 cell's error, (2^c - 1 - d)^2, is
  larger than var_k for sparse slices, and although it lowers the noise when the variation's own
  sigma_dev,k^2 exceeds var_k (e.g. a large ind_vari).
- sigma_dev,k^2 is per cell as written; a differential pair has two cells, which for
  state_independent errors would double the per-weight variance (not applied).

``device_model="cells"`` (ours, not the paper's; the published form stays the default) replaces
sigma_dev,k^2 by the expected squared read error of the weight slice's differential pair under the
simulator's own cell model (nipa.hardware.device_errors): the slice's level d = |s_k| sits on one cell at
G = d + g0, the other cell at g0, g0 = L / (R - 1), L = 2^c - 1; each cell is healthy with probability
1 - 2p and then carries its variation, else stuck at G_min (error -d, or 0 on the empty cell) or at
G_max (error L - d, or L). In expectation over the slice values:

    sigma_pair,k^2 = (1 - 2p) V_k + p (2 E[d^2] - 2 L E[d] + 2 L^2),
    V_k = vari^2 (E[d^2] + 2 g0 E[d] + 2 g0^2)        state_dependent (both cells' G scale the noise)
          2 laplace_b^2 (the same bracket)             laplace
          2 ind_vari^2                                 state_independent (two cells)

with E[d^2] = mean_sq_k and E[d] = mean_abs_k from the statistics. It differs from the published form
where the published one is loose: a stuck-at-1 cell's error (L - d)^2 and the empty cell's L^2 are far
above var_k for sparse slices (for 1-bit cells the pair's fault error is exactly 2p, against 2p var_k
= 2p density_k), and the additive noise falls on both cells. The A_k factor is kept, with this
variance. Measured on smallcnn/mnist5k's Device_Search_space.ini (README): it ranks the simulated
layers' measured noise with Kendall tau 0.99 against 0.63 for the published form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import erfc

from nipa.errors import UserError
from nipa.estimation.stats import ComboStats, ModelStats, combo_key, parse_combo_key
from nipa.hardware.config import VARI_TYPES, HWConfig, PerLayerConfig, config_from_dict

REDUCTIONS = ("model_average", "layer_sum")
# "ground_truth": the ADC step of each point's ADC mode as the simulator reads it; "published": S density_k
# / 2^a_r for every point (the paper's form, which assumed a range per read of one tile).
ADC_TERMS = ("ground_truth", "published", "input_bits")
# "input_bits": the ground-truth step, its noise scaled by input_adc_factor(wl_input) (the input's bit-serial
# shift and add; 1 at 8-bit inputs, the published spaces').
# "none": the published metric, which does not see the input bits; "rounding": the input's rounding noise
# under the same clipping assumption the published Q makes for the weights (input_rounding_share).
INPUT_TERMS = ("none", "rounding")
# ADC modes whose range is shared by all tiles of a layer: the step widens by the tile range ratio.
_SHARED_RANGE_MODES = ("dynamic", "calibrated")
TILE_FACTORS = ("tiles", "one")
DEVICE_MODELS = ("published", "cells")
# Integer codes of the variation types in the vectorized arrays (index into config.VARI_TYPES).
VARI_CODE = {name: code for code, name in enumerate(VARI_TYPES)}
_STATE_DEPENDENT, _STATE_INDEPENDENT, _LAPLACE = (VARI_CODE[n] for n in
                                                  ("state_dependent", "state_independent", "laplace"))


def weight_rounding_noise(weight_var: float | np.ndarray, wl_weight: int | np.ndarray) -> np.ndarray:
    """Q = 3 sigma_w^2 / (s^2 2^(2b)) with s = 6 sigma_w / 2^b, in LSB^2 of the integer weight.

    s^2 2^(2b) = 36 sigma_w^2, so Q = 3 / 36 = 1/12 (the rounding noise of a unit step) for every
    sigma_w > 0 and b; a layer of zeros (sigma_w = 0) also gets 1/12.
    """
    weight_var = np.asarray(weight_var, dtype=np.float64)
    four_b = 4.0 ** np.asarray(wl_weight, dtype=np.float64)
    step_sq = 36.0 * weight_var / four_b  # s^2 with s = 6 sigma_w / 2^b
    with np.errstate(divide="ignore", invalid="ignore"):
        q = 3.0 * weight_var / (step_sq * four_b)
    return np.where(weight_var > 0, q, 1.0 / 12.0)


def adc_noise(density: np.ndarray, subArray: np.ndarray | int, adc_bits: np.ndarray | int,
              tiles: np.ndarray | float = 1.0) -> np.ndarray:
    """ADC_k = k_T S density_k^2 / (12 2^(2 a_r)) per weight, in LSB^2 of slice k (k_T = `tiles`)."""
    density = np.asarray(density, dtype=np.float64)
    return np.asarray(tiles, dtype=np.float64) * np.asarray(subArray, dtype=np.float64) * density**2 / (
        12.0 * 4.0 ** np.asarray(adc_bits, dtype=np.float64))


def device_variance(var: np.ndarray, vari_code: np.ndarray | int, spread: np.ndarray | float,
                    saf_prop: np.ndarray | float = 0.0) -> np.ndarray:
    """sigma_dev,k^2 per cell from the slice variance var_k (see the module docstring).

    vari_code: index into config.VARI_TYPES (or a type name for a scalar call).
    """
    if isinstance(vari_code, str):
        vari_code = VARI_CODE[vari_code]
    var = np.asarray(var, dtype=np.float64)
    code = np.asarray(vari_code)
    spread_sq = np.asarray(spread, dtype=np.float64) ** 2
    sigma2 = np.where(code == _STATE_DEPENDENT, spread_sq * var,
                      np.where(code == _LAPLACE, 2.0 * spread_sq * var, spread_sq + 0.0 * var))
    p = np.asarray(saf_prop, dtype=np.float64)
    # As SPEC section 6 writes it: with probability 2p a cell is stuck (error power var_k), otherwise
    # it carries the variation.
    return 2.0 * p * var + (1.0 - 2.0 * p) * sigma2


def pair_device_variance(mean_sq: np.ndarray, mean_abs: np.ndarray, vari_code: np.ndarray | int,
                         spread: np.ndarray | float, saf_prop: np.ndarray | float, cellBit: np.ndarray | int,
                         onoffratio: np.ndarray | float) -> np.ndarray:
    """sigma_pair,k^2 of ``device_model="cells"``: a weight slice's differential pair, in level^2 (see the
    module docstring). mean_sq, mean_abs: [..., K]; the other arguments broadcast against them."""
    if isinstance(vari_code, str):
        vari_code = VARI_CODE[vari_code]
    mean_sq = np.asarray(mean_sq, dtype=np.float64)
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    code = np.asarray(vari_code)
    spread_sq = np.asarray(spread, dtype=np.float64) ** 2
    top = 2.0 ** np.asarray(cellBit, dtype=np.float64) - 1.0  # L, the top level
    ratio = np.asarray(onoffratio, dtype=np.float64)
    with np.errstate(divide="ignore"):
        g0 = np.where(np.isfinite(ratio), top / (ratio - 1.0), 0.0)
    level_power = mean_sq + 2.0 * g0 * mean_abs + 2.0 * g0**2  # E[G_pos^2 + G_neg^2]
    healthy = np.where(code == _STATE_DEPENDENT, spread_sq * level_power,
                       np.where(code == _LAPLACE, 2.0 * spread_sq * level_power, 2.0 * spread_sq + 0.0 * mean_sq))
    stuck = 2.0 * mean_sq - 2.0 * top * mean_abs + 2.0 * top**2  # SA0 and SA1 on either cell, per p
    p = np.asarray(saf_prop, dtype=np.float64)
    return (1.0 - 2.0 * p) * healthy + p * stuck


def unabsorbed_share(subArray: np.ndarray | int, sigma2: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """A_k = max(0, 1 - E[X^2 1{|X| < delta/2}] / v), X ~ N(0, v), v = S sigma2, in closed form.

    With u = delta / (2 sqrt v): A = erfc(u / sqrt 2) + sqrt(2/pi) u exp(-u^2 / 2). Where v = 0 there
    is no device error to absorb and A is returned as 0 (the caller multiplies it by sigma2 = 0).
    """
    v = np.asarray(subArray, dtype=np.float64) * np.asarray(sigma2, dtype=np.float64)
    half_step = 0.5 * np.asarray(delta, dtype=np.float64)
    positive = v > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(positive, half_step / np.sqrt(np.where(positive, v, 1.0)), np.inf)
        share = erfc(u / math.sqrt(2.0)) + math.sqrt(2.0 / math.pi) * u * np.exp(-0.5 * u * u)
    share = np.where(np.isfinite(u), share, 0.0)  # u = inf: v = 0, nothing to absorb
    return np.clip(share, 0.0, 1.0)  # the max(0, .) of the definition; also trims float rounding


def slice_noise_terms(var: np.ndarray, density: np.ndarray, tiles: np.ndarray | float,
                      subArray: np.ndarray | int, adc_bits: np.ndarray | int, vari_code: np.ndarray | int,
                      spread: np.ndarray | float,
                      saf_prop: np.ndarray | float,
                      sigma2: np.ndarray | None = None,
                      delta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ADC_k, sigma_dev,k^2 A_k): the two noise terms of every slice, in LSB^2 of that slice.

    var, density: [..., K]; the other arguments broadcast against [...]. Also what the error-injection
    method (SPEC section 7) adds to each slice value, from one layer's own statistics. sigma2 [..., K]:
    the device variance to use instead of the published sigma_dev,k^2 (e.g. `pair_device_variance`).
    delta [..., K]: the ADC step in level units instead of the published S density_k / 2^a_r
    (`adc_step`); ADC_k = k_T delta^2 / (12 S) either way.
    """
    var = np.asarray(var, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    lead = var.shape[:-1]

    def per_point(x: Any) -> np.ndarray:  # [...] -> [..., 1], to broadcast against the slice axis
        return np.broadcast_to(np.asarray(x), lead)[..., None]

    subarray_ = per_point(subArray).astype(np.float64)
    adc_ = per_point(adc_bits).astype(np.float64)
    if delta is None:
        adc = adc_noise(density, subarray_, adc_, per_point(tiles))
        delta = subarray_ * density / 2.0**adc_  # the ADC step of the column, in level units
    else:
        delta = np.asarray(delta, dtype=np.float64)
        adc = per_point(tiles) * delta**2 / (12.0 * subarray_)  # = adc_noise at the published step
    if sigma2 is None:
        sigma2 = device_variance(var, per_point(vari_code), per_point(spread), per_point(saf_prop))
    device = sigma2 * unabsorbed_share(subarray_, sigma2, delta)
    return adc, device


def input_rounding_share(wl_input: np.ndarray | int) -> np.ndarray:
    """The input's rounding noise relative to its signal: (1/12) / var(x_q), with var(x_q) =
    ((2^(a-1) - 1) / 3)^2, i.e. a per-tensor max-abs scale that clips at 3 sigma, the assumption the
    published weight term makes (s = 6 sigma_w / 2^b). An output's error from input rounding is this share
    of its signal, so in the metric's units it adds share * signal to the noise: NIPA = S / (N + share S).
    With one wl_input for every point (the published spaces) this is a monotone transform of NIPA and
    changes no ranking; it matters where the input bits vary (explore.py's space)."""
    levels = 2.0 ** (np.asarray(wl_input, dtype=np.float64) - 1.0) - 1.0
    return (1.0 / 12.0) / (levels / 3.0) ** 2


def input_adc_factor(wl_input: np.ndarray | int) -> np.ndarray:
    """How much the bit-serial input scales the ADC noise against the signal (adc_term "input_bits").

    Every one of the a - 1 input bits z is read with its own ADC step (the dynamic range follows each bit's
    partial sums, so the steps are taken equal), and the shift and add weighs its error by 4^z: the output's
    ADC noise is sum_z 4^z = (4^(a-1) - 1) / 3 steps^2, while the signal is that of the a-bit input, var(x_q) =
    ((2^(a-1) - 1) / 3)^2 under the 3-sigma clipping input_rounding_share assumes. Their ratio,
    3 (4^(a-1) - 1) / (2^(a-1) - 1)^2, grows as the input bits fall (4-bit inputs: 1.27 times 8-bit ones); it is
    divided by its 8-bit value so that the term equals "ground_truth" at 8-bit inputs."""
    def ratio(bits: np.ndarray) -> np.ndarray:
        return 3.0 * (4.0 ** (bits - 1.0) - 1.0) / (2.0 ** (bits - 1.0) - 1.0) ** 2

    return ratio(np.asarray(wl_input, dtype=np.float64)) / ratio(np.float64(8.0))


def adc_step(density: np.ndarray, subArray: np.ndarray | int, adc_bits: np.ndarray | int,
             cellBit: np.ndarray | int, adc_mode: np.ndarray | str,
             tile_range_ratio: np.ndarray | None) -> np.ndarray:
    """The ADC step of slice k in level units as the simulator's ADC mode sets it (adc_term "ground_truth"):

    - dynamic_tile (a range per tile and read): the published S density_k / 2^a_r;
    - dynamic and calibrated (one range shared by every tile of the layer): the published step times
      the tile range ratio of the statistics (max over tiles of a tile's column range over their RMS);
    - full: the physical full scale 2 S (2^c - 1) / 2^a_r, whatever the weights.

    density, tile_range_ratio: [..., K]; the others broadcast against [..., 1].
    """
    density = np.asarray(density, dtype=np.float64)
    rows = np.asarray(subArray, dtype=np.float64)
    levels = 2.0 ** np.asarray(adc_bits, dtype=np.float64)
    published = rows * density / levels
    mode = np.asarray(adc_mode)
    shared = np.isin(mode, _SHARED_RANGE_MODES)
    if np.any(shared):
        if tile_range_ratio is None:
            raise UserError("these statistics predate tile_range_ratio (format 3), which the ADC term of a "
                            "dynamic or calibrated ADC needs: recompute them with stat.py --overwrite, or "
                            "use the published ADC term (--adc_term published)")
        ratio = np.asarray(tile_range_ratio, dtype=np.float64)
    else:
        ratio = np.ones_like(density)
    full = 2.0 * rows * (2.0 ** np.asarray(cellBit, dtype=np.float64) - 1.0) / levels
    return np.where(mode == "full", full + 0.0 * density, np.where(shared, published * ratio, published))


def nipa_terms(var: np.ndarray, density: np.ndarray, tiles: np.ndarray | float, subArray: np.ndarray | int,
               cellBit: np.ndarray | int, adc_bits: np.ndarray | int, vari_code: np.ndarray | int,
               spread: np.ndarray | float, saf_prop: np.ndarray | float,
               valid: np.ndarray | None = None, weight_var: np.ndarray | float = 1.0,
               wl_weight: np.ndarray | int = 8, sigma2: np.ndarray | None = None,
               delta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The vectorized core: (signal, noise) of the NIPA formula; NIPA = signal / noise.

    var, density: [..., K] per-slice statistics; every other argument broadcasts against [...]
    (one value per hardware point and/or layer). valid [..., K] marks real slices where K varies
    (padding slices must not add state-independent noise); default: all valid. sigma2 [..., K]: the
    device variance instead of the published sigma_dev,k^2 (``device_model="cells"``); delta [..., K]:
    the ADC step instead of the published one (`adc_step`).
    """
    var = np.asarray(var, dtype=np.float64)
    lead = var.shape[:-1]
    cellbit_ = np.broadcast_to(np.asarray(cellBit), lead)[..., None].astype(np.float64)
    k = np.arange(var.shape[-1], dtype=np.float64)
    significance = 4.0 ** (cellbit_ * k)  # 4^(c k) = (2^(c k))^2: the slice's weight, squared
    if valid is not None:
        significance = np.where(valid, significance, 0.0)
    adc, device = slice_noise_terms(var, density, tiles, subArray, adc_bits, vari_code, spread, saf_prop, sigma2,
                                    delta)
    signal = (significance * var).sum(axis=-1)
    q = weight_rounding_noise(np.broadcast_to(np.asarray(weight_var), lead), np.broadcast_to(wl_weight, lead))
    noise = q + (significance * (adc + device)).sum(axis=-1)
    return signal, noise


# ----------------------------------------------------------------------------------------------------
# From statistics and hardware points
# ----------------------------------------------------------------------------------------------------


def point_arrays(points: Sequence[HWConfig | Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Hardware points -> one array per parameter the metric uses (plus the statistics key)."""
    configs = [p if isinstance(p, HWConfig) else HWConfig.from_dict(dict(p)) for p in points]
    return {
        "key": np.array([combo_key(p.wl_weight, p.subArray, p.cellBit) for p in configs]),
        "wl_weight": np.array([p.wl_weight for p in configs], dtype=np.int64),
        "subArray": np.array([p.subArray for p in configs], dtype=np.int64),
        "cellBit": np.array([p.cellBit for p in configs], dtype=np.int64),
        "adc_bits": np.array([p.ADCprecision for p in configs], dtype=np.int64),
        "vari_code": np.array([VARI_CODE[p.vari_type] for p in configs], dtype=np.int64),
        "spread": np.array([p.device_spread for p in configs], dtype=np.float64),
        "saf_prop": np.array([p.SAF_prop for p in configs], dtype=np.float64),
        "onoffratio": np.array([p.onoffratio for p in configs], dtype=np.float64),
        "adc_mode": np.array([p.adc_mode for p in configs]),
        "wl_input": np.array([p.wl_input for p in configs], dtype=np.int64),
    }


def _as_points(points: HWConfig | PerLayerConfig | Mapping[str, Any] | Sequence) -> tuple[list, bool]:
    if isinstance(points, (HWConfig, PerLayerConfig, Mapping)):
        return [points], True
    return list(points), False


def combo_mean_abs(combo: ComboStats) -> np.ndarray:
    """mean_abs [L, K] of a combination; statistics files of format 1 lack it, which is exact to fill
    for 1-bit cells only (|s_k| is 0 or 1, so its mean is the density)."""
    if combo.mean_abs is not None:
        return combo.mean_abs
    if combo.cellBit == 1:
        return combo.density
    raise KeyError(f"the statistics of {combo.key} predate mean_abs (needed by device_model='cells' for "
                   f"cellBit {combo.cellBit}); recompute them with stat.py --overwrite")


def combo_device_variance(combo: ComboStats, hw: HWConfig, device_model: str,
                          model_average: bool = False) -> np.ndarray | None:
    """The device variance of one point's slices for `device_model`: None for "published" (the
    callees compute sigma_dev,k^2 themselves), sigma_pair,k^2 [L, K] (or [1, K] from the layer-averaged
    statistics) for "cells"."""
    if device_model != "cells":
        return None
    mean_sq, mean_abs = combo.mean_sq, combo_mean_abs(combo)
    if model_average:
        mean_sq, mean_abs = mean_sq.mean(axis=0)[None], mean_abs.mean(axis=0)[None]
    return pair_device_variance(mean_sq, mean_abs, VARI_CODE[hw.vari_type], hw.device_spread, hw.SAF_prop,
                                hw.cellBit, hw.onoffratio)


def _gather(stats: ModelStats | ComboStats, keys: Sequence[str], per_layer: bool,
            cell_levels: bool = False) -> dict[str, np.ndarray]:
    """Statistics for every point, the slice axis zero-padded to the largest K: arrays [N, (L,) K]
    (with `cell_levels` also mean_sq and mean_abs, which device_model "cells" needs)."""
    wanted = list(dict.fromkeys(keys))
    if isinstance(stats, ComboStats):
        if wanted != [stats.key]:
            other = ", ".join(k for k in wanted if k != stats.key)
            raise KeyError(f"these statistics are for {stats.key} only, not {other}")
        combos = [stats]
    else:
        combos = [stats.get(*parse_combo_key(key)) for key in wanted]
    k_max = max(c.num_slices for c in combos)

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_max - x.shape[-1])])

    fields = ("var", "density", "valid", "tiles", "weight_var", "tile_range_ratio") + (
        ("mean_sq", "mean_abs") if cell_levels else ())
    table: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    for combo in combos:
        if per_layer:
            var, density, tiles, weight_var = combo.var, combo.density, combo.tiles, combo.weight_var
        else:
            avg = combo.model_average()
            var, density, tiles, weight_var = avg["var"], avg["density"], avg["tiles"], avg["weight_var"]
        if cell_levels:
            mean_abs = combo_mean_abs(combo)
            table["mean_sq"].append(pad(combo.mean_sq if per_layer else combo.mean_sq.mean(axis=0)))
            table["mean_abs"].append(pad(mean_abs if per_layer else mean_abs.mean(axis=0)))
        var = np.asarray(var, dtype=np.float64)
        ratio = combo.tile_range_ratio
        if ratio is None:  # statistics before format 3: NaN, an error only where the ADC term needs it
            ratio = np.full(combo.var.shape, np.nan)
        table["tile_range_ratio"].append(pad(ratio if per_layer else ratio.mean(axis=0)))
        table["var"].append(pad(var))
        table["density"].append(pad(np.asarray(density, dtype=np.float64)))
        table["valid"].append(pad(np.ones(var.shape, dtype=bool)))
        table["tiles"].append(np.asarray(tiles, dtype=np.float64))
        table["weight_var"].append(np.asarray(weight_var, dtype=np.float64))
    position = {key: i for i, key in enumerate(wanted)}
    index = np.fromiter((position[key] for key in keys), dtype=np.int64, count=len(keys))
    return {name: np.stack(values)[index] for name, values in table.items()}


def check_options(tile_factor: str = "tiles", device_model: str = "published",
                  reduction: str = "model_average", adc_term: str = "ground_truth", input_term: str = "none") -> None:
    """ValueError naming the allowed values of a metric option."""
    for name, value, allowed in (("tile_factor", tile_factor, TILE_FACTORS),
                                 ("device_model", device_model, DEVICE_MODELS),
                                 ("reduction", reduction, REDUCTIONS),
                                 ("adc_term", adc_term, ADC_TERMS),
                                 ("input_term", input_term, INPUT_TERMS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")


def _terms_for_points(stats: ModelStats | ComboStats, points, per_layer: bool, tile_factor: str,
                      device_model: str = "published", adc_term: str = "ground_truth", input_term: str = "none"):
    check_options(tile_factor, device_model, adc_term=adc_term, input_term=input_term)
    hw = point_arrays(points)
    gathered = _gather(stats, hw["key"].tolist(), per_layer, cell_levels=device_model == "cells")
    extra = (slice(None), None) if per_layer else (slice(None),)  # hardware arrays [N] -> [N, 1]
    tiles = gathered["tiles"] if tile_factor == "tiles" else np.ones_like(gathered["tiles"])
    sigma2 = None
    if device_model == "cells":
        per_slice = extra + (None,)  # [N] -> [N, (1,) 1], against [N, (L,) K]
        sigma2 = pair_device_variance(gathered["mean_sq"], gathered["mean_abs"], hw["vari_code"][per_slice],
                                      hw["spread"][per_slice], hw["saf_prop"][per_slice], hw["cellBit"][per_slice],
                                      hw["onoffratio"][per_slice])
    delta = None
    if adc_term in ("ground_truth", "input_bits"):
        per_slice = extra + (None,)
        ratio = gathered["tile_range_ratio"]
        shared = np.isin(hw["adc_mode"], _SHARED_RANGE_MODES)
        delta = adc_step(gathered["density"], hw["subArray"][per_slice], hw["adc_bits"][per_slice],
                         hw["cellBit"][per_slice], hw["adc_mode"][per_slice],
                         None if np.isnan(ratio[shared]).any() else np.nan_to_num(ratio, nan=1.0))
        if adc_term == "input_bits":  # ADC_k grows with delta^2
            delta = delta * np.sqrt(input_adc_factor(hw["wl_input"][per_slice]))
    signal, noise = nipa_terms(
        gathered["var"], gathered["density"], tiles, hw["subArray"][extra], hw["cellBit"][extra],
        hw["adc_bits"][extra], hw["vari_code"][extra], hw["spread"][extra], hw["saf_prop"][extra],
        valid=gathered["valid"], weight_var=gathered["weight_var"], wl_weight=hw["wl_weight"][extra],
        sigma2=sigma2, delta=delta)
    if input_term == "rounding":
        noise = noise + input_rounding_share(hw["wl_input"][extra]) * signal
    return signal, noise


def nipa_metric(stats: ModelStats | ComboStats, points: HWConfig | Mapping[str, Any] | Sequence,
                reduction: str = "model_average", tile_factor: str = "tiles",
                device_model: str = "published", adc_term: str = "ground_truth",
                input_term: str = "none") -> np.ndarray | float:
    """Model-level NIPA of hardware points: an array [N] (a float for a single point).

    reduction: "model_average" (default, published: layer-averaged statistics in one formula) or
    "layer_sum" (sum of the layers' signals over the sum of their noises). device_model: "published"
    (default) or "cells" (see the module docstring). adc_term: "ground_truth" (default: the step of
    each point's ADC mode, `adc_step`) or "published" (S density_k / 2^a_r). input_term: "none" (default,
    published) or "rounding" (`input_rounding_share`). Higher NIPA = more robust.
    """
    check_options(tile_factor, device_model, reduction, adc_term, input_term)
    point_list, single = _as_points(points)
    if not point_list:
        return np.zeros(0)
    point_list = [config_from_dict(p) if isinstance(p, Mapping) else p for p in point_list]
    if reduction == "model_average":
        per_layer_points = [p for p in point_list if isinstance(p, PerLayerConfig)]
        if per_layer_points:
            raise UserError(f"a per-layer hardware point ({per_layer_points[0].describe()}) needs the metric's "
                            "reduction 'layer_sum': 'model_average' averages the layers' statistics under one "
                            "configuration")
        signal, noise = _terms_for_points(stats, point_list, False, tile_factor, device_model, adc_term, input_term)
    else:
        signal, noise = _layer_terms(stats, point_list, tile_factor, device_model, adc_term, input_term)
        # Each layer's terms in units of its own full-scale weight, (2^(b-1) - 1)^2 LSB^2, so that layers of
        # other weight bits add comparably; with one wl_weight for all layers this scale cancels.
        full_scale = (2.0 ** (_layer_field(stats, point_list, "wl_weight") - 1.0) - 1.0) ** 2
        signal, noise = (signal / full_scale).sum(axis=-1), (noise / full_scale).sum(axis=-1)
    value = signal / noise
    return float(value[0]) if single else value


def _layer_field(stats: ModelStats | ComboStats, points: Sequence, field: str) -> np.ndarray:
    """[N, L]: `field` of every layer's effective point (a PerLayerConfig's `for_layer`)."""
    layers = stats.layers
    return np.array([[getattr(p.for_layer(name) if isinstance(p, PerLayerConfig) else p, field) for name in layers]
                     for p in points], dtype=np.float64)


def _layer_terms(stats: ModelStats | ComboStats, points: Sequence, tile_factor: str, device_model: str,
                 adc_term: str, input_term: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(signal, noise) [N, L] of every layer from its own statistics at its own effective point. Uniform
    points take the vectorized path; a PerLayerConfig expands into its layers' effective points, each
    evaluated on every layer, of which layer l keeps the row of its own point (L is small)."""
    points = [config_from_dict(p) if isinstance(p, Mapping) else p for p in points]
    uniform = [i for i, p in enumerate(points) if not isinstance(p, PerLayerConfig)]
    layered = [i for i, p in enumerate(points) if isinstance(p, PerLayerConfig)]
    num_layers = len(stats.layers)
    signal = np.zeros((len(points), num_layers))
    noise = np.zeros((len(points), num_layers))
    if uniform:
        s, n = _terms_for_points(stats, [points[i] for i in uniform], True, tile_factor, device_model, adc_term,
                                 input_term)
        signal[uniform], noise[uniform] = s, n
    if layered:
        effective = [points[i].for_layer(name) for i in layered for name in stats.layers]
        s, n = _terms_for_points(stats, effective, True, tile_factor, device_model, adc_term, input_term)
        own = np.arange(num_layers)
        signal[layered] = s.reshape(len(layered), num_layers, num_layers)[:, own, own]
        noise[layered] = n.reshape(len(layered), num_layers, num_layers)[:, own, own]
    return signal, noise


def per_layer_nipa(stats: ModelStats | ComboStats, points: HWConfig | Mapping[str, Any] | Sequence,
                   tile_factor: str = "tiles", device_model: str = "published",
                   adc_term: str = "ground_truth") -> np.ndarray:
    """NIPA of every mapped layer from its own statistics: [N, L] ([L] for a single point).

    Layers are in the order of ``stats.layers``. Lower NIPA = more sensitive layer. A PerLayerConfig's
    layers each take their own effective point.
    """
    point_list, single = _as_points(points)
    signal, noise = _layer_terms(stats, point_list, tile_factor, device_model, adc_term)
    value = signal / noise
    return value[0] if single else value


def rank_layers(stats: ModelStats | ComboStats, point: HWConfig | Mapping[str, Any],
                tile_factor: str = "tiles", device_model: str = "published",
                adc_term: str = "ground_truth") -> list[tuple[str, float]]:
    """(layer, NIPA) pairs for one hardware point, most sensitive (lowest NIPA) first."""
    values = per_layer_nipa(stats, point, tile_factor=tile_factor, device_model=device_model, adc_term=adc_term)
    layers = stats.layers
    return sorted(zip(layers, values.tolist(), strict=True), key=lambda pair: pair[1])


def layer_slice_noise(stats: ModelStats | ComboStats, point: HWConfig | Mapping[str, Any],
                      tile_factor: str = "tiles", device_model: str = "published",
                      adc_term: str = "published") -> dict[str, np.ndarray]:
    """Per layer and slice, the noise terms of one hardware point from each layer's own statistics.

    Returns {"adc": [L, K], "device": [L, K], "total": [L, K]} in LSB^2 of each slice (device is
    sigma_dev,k^2 A_k, or sigma_pair,k^2 A_k with device_model "cells"); layers in the order of
    ``stats.layers``. adc_term: "published" by default here, the estimate's form as the paper gives it
    (SPEC section 7); "ground_truth" takes the step of the point's ADC mode (`adc_step`).
    """
    check_options(tile_factor, device_model, adc_term=adc_term)
    hw = point if isinstance(point, HWConfig) else HWConfig.from_dict(dict(point))
    combo = stats if isinstance(stats, ComboStats) else stats.for_point(hw)
    if combo.key != combo_key(hw.wl_weight, hw.subArray, hw.cellBit):
        raise KeyError(f"these statistics are for {combo.key} only, not {hw.describe()}")
    tiles = combo.tiles if tile_factor == "tiles" else np.ones_like(combo.tiles)
    sigma2 = combo_device_variance(combo, hw, device_model)
    delta = None
    if adc_term in ("ground_truth", "input_bits"):
        delta = adc_step(combo.density, hw.subArray, hw.ADCprecision, hw.cellBit, hw.adc_mode, combo.tile_range_ratio)
        if adc_term == "input_bits":
            delta = delta * np.sqrt(input_adc_factor(hw.wl_input))
    adc, device = slice_noise_terms(combo.var, combo.density, tiles, hw.subArray, hw.ADCprecision,
                                    VARI_CODE[hw.vari_type], hw.device_spread, hw.SAF_prop, sigma2, delta)
    return {"adc": adc, "device": device, "total": adc + device}

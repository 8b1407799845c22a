"""`--compat`: the original tool's pipeline choices, each a named switch, so that a user can reproduce
its numbers and see what each of our fixes changes (README, "What each fix changes").

The facts come from reading the authors' public implementation (gld17/NIPA); nothing of it is copied.
Our defaults follow SPEC section 4; each switch below restores one choice of the original:

- `per_read`: device error redrawn on every read (every input bit of every forward), as the original and
  DNN+NeuroSim V1.4 do; ours draws it once per chip (programming variation, fixed while a chip runs).
- `signed_cells`: one signed cell per slice instead of a differential pair of cells, so a zero slice has
  no cell to err and there is no G_min leak.
- `original_slices`: K = floor(wl_weight / cellBit) - 1 slices instead of ceil((wl_weight - 1) / cellBit);
  equal for 1-bit cells, fewer for multi-level cells (the top magnitude digits are dropped: for
  wl_weight 9 and cellBit 2 the top two magnitude bits).
- `original_faults`: a stuck-at-1 cell reads sign(value) (so it does nothing on a zero cell) and a
  stuck-at-0 cell reads 1/onoffratio, instead of G_max and G_min.
- `digital_classifier`: the final classifier (the last nn.Linear) of a CNN stays digital, as in the
  original's statistics and fast estimate (its ground truth maps it; the `original` preset does too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nipa.errors import UserError

SWITCHES = ("per_read", "signed_cells", "original_slices", "original_faults", "digital_classifier")
# The original's ground truth (its main.py) maps the classifier too; only its stat.py and wrap_error.py
# keep it digital. So the preset that reproduces its ground truth leaves `digital_classifier` off.
PRESETS = {"none": (), "original": SWITCHES[:4]}


class CompatError(UserError):
    """An unknown --compat name."""


@dataclass(frozen=True)
class Compat:
    """Which of the original tool's choices the simulator reproduces (all off: SPEC section 4)."""

    per_read: bool = False
    signed_cells: bool = False
    original_slices: bool = False
    original_faults: bool = False
    digital_classifier: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Compat:
        """'original', 'none', or a comma-separated list of switch names ('signed_cells,per_read')."""
        if not text:
            return cls()
        names: list[str] = []
        for item in (part.strip() for part in text.split(",")):
            if item in PRESETS:
                names += PRESETS[item]
            elif item in SWITCHES:
                names.append(item)
            else:
                raise CompatError(f"--compat {text!r}: unknown name {item!r}; choose 'original', 'none' or "
                                  f"switches among {', '.join(SWITCHES)}")
        return cls(**{name: True for name in names})

    @property
    def switches(self) -> list[str]:
        return [name for name in SWITCHES if getattr(self, name)]

    def describe(self) -> str:
        """'none', 'original' (the preset) or the switch list."""
        on = self.switches
        if not on:
            return "none"
        return "original" if tuple(on) == PRESETS["original"] else ",".join(on)

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    def num_slices(self, wl_weight: int, cell_bits: int) -> int:
        """K: the cell digits of the weight magnitude that the crossbar stores."""
        if self.original_slices:
            return max(1, wl_weight // cell_bits - 1)
        return -(-(wl_weight - 1) // cell_bits)


NO_COMPAT = Compat()

"""Hardware points and the INI search space that lists their choices.

A hardware point (`HWConfig`) is one full set of PIM parameters (SPEC section 3). A search space
(`SearchSpace`) is read from an INI file in the original tool's format: sections `[Algorithm_Level]`,
`[Hardware_Level]`, `[Device_Level]`, every value a comma-separated list of choices. Every value is
checked before any work starts, and an error names the file, section, key and value.
"""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import itertools
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nipa.errors import UserError

VARI_TYPES = ("state_dependent", "state_independent", "laplace")
ADC_MODES = ("dynamic", "dynamic_tile", "calibrated", "full")

# INI layout of the original tool: section -> (INI key -> HWConfig field). The key spelling is the
# original's; `ADCmode` is our optional extension (range mode of the ADC, SPEC section 4 step 6).
INI_LAYOUT: dict[str, dict[str, str]] = {
    "Algorithm_Level": {"wl_weight": "wl_weight", "wl_input": "wl_input"},
    "Hardware_Level": {"subArray": "subArray", "ADCprecision": "ADCprecision", "ADCmode": "adc_mode"},
    "Device_Level": {
        "cellBit": "cellBit",
        "onoffratio": "onoffratio",
        "vari_type": "vari_type",
        "vari": "vari",
        "laplace_b": "laplace_b",
        "ind_vari": "ind_vari",
        "SAF_prop": "SAF_prop",
    },
}

# The spread that belongs to each variation type; the other two are ignored for that type.
SPREAD_OF_TYPE = {"state_dependent": "vari", "state_independent": "ind_vari", "laplace": "laplace_b"}

# Cost-only knobs (nipa.hardware.cost): they change area, energy and latency but not what the simulator computes,
# so they are read beside the HWConfig choices (SearchSpace.cost_choices) and never enter HWConfig,
# its key() or the records. INI key (in [Hardware_Level]) -> default when the key is missing.
COST_KNOBS: dict[str, int] = {"ADC_share": 8, "crossbar_columns": 256}
# The optional section of coefficient overrides of the cost model (names: nipa.hardware.cost.CostCoefficients).
COST_SECTION = "Cost"


class ConfigError(UserError):
    """A hardware parameter or search-space entry that makes no sense."""


@dataclass(frozen=True)
class HWConfig:
    """One hardware point. Defaults are the ones a key missing from the INI takes (see README)."""

    wl_weight: int = 8  # weight bits including sign
    wl_input: int = 8  # input bits including sign, fed bit-serially
    subArray: int = 128  # crossbar rows summed by one ADC read
    ADCprecision: int = 5  # ADC bits
    cellBit: int = 1  # bits per cell
    onoffratio: float = 1e8  # G_max / G_min
    vari_type: str = "state_dependent"
    vari: float = 0.0  # state_dependent: G * (1 + N(0, vari))
    ind_vari: float = 0.0  # state_independent: G + N(0, ind_vari), in level units
    laplace_b: float = 0.0  # laplace: G * (1 + Laplace(0, laplace_b))
    SAF_prop: float = 0.0  # probability of stuck-at-0 and, separately, of stuck-at-1, per cell
    adc_mode: str = "dynamic"

    def __post_init__(self) -> None:
        problems = validation_problems(dataclasses.asdict(self))
        if problems:
            field, value, why = problems[0]
            raise ConfigError(f"hardware parameter {field}={value!r}: {why}")

    @property
    def num_slices(self) -> int:
        """K: the number of cellBit-wide digits of the weight magnitude."""
        return math.ceil((self.wl_weight - 1) / self.cellBit)

    @property
    def device_spread(self) -> float:
        """The spread of the configured variation type."""
        return float(getattr(self, SPREAD_OF_TYPE[self.vari_type]))

    @property
    def has_device_error(self) -> bool:
        return self.device_spread > 0 or self.SAF_prop > 0

    @property
    def batch_dependent(self) -> bool:
        """Whether an image's result depends on the other images of its batch: a dynamic ADC range is the
        range of one batch's reads (and of one tile's, dynamic_tile), so the order of the test set moves
        the accuracy (by several points at 3-4-bit ADCs: README, main.py --test_order)."""
        return self.adc_mode in ("dynamic", "dynamic_tile")

    def canonical(self) -> HWConfig:
        """The same point with the spreads of the other variation types set to zero, so equal points
        compare equal whatever the unused keys said."""
        keep = SPREAD_OF_TYPE[self.vari_type]
        zeroed = {name: 0.0 for name in SPREAD_OF_TYPE.values() if name != keep}
        return dataclasses.replace(self, **zeroed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HWConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown hardware parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def key(self) -> str:
        """A short stable identifier, used to match records of the same point."""
        d = self.canonical().to_dict()
        return ",".join(f"{name}={d[name]}" for name in sorted(d))

    def describe(self) -> str:
        spread = f"{SPREAD_OF_TYPE[self.vari_type]}={self.device_spread:g}"
        return (
            f"W{self.wl_weight} I{self.wl_input} S{self.subArray} ADC{self.ADCprecision}({self.adc_mode}) "
            f"c{self.cellBit} R{self.onoffratio:g} {self.vari_type}:{spread} SAF{self.SAF_prop:g}"
        )


# The fields a hardware point may set per mapped layer (PerLayerConfig): the ones that change one layer's
# crossbars, ADCs and input drivers. Device and ADC-mode fields describe the whole chip and stay global.
LAYER_FIELDS = ("wl_weight", "wl_input", "subArray", "ADCprecision", "cellBit")
# Short names of the per-layer fields in describe() (as HWConfig.describe writes them).
_LAYER_FIELD_TAGS = {"wl_weight": "W", "wl_input": "I", "subArray": "S", "ADCprecision": "ADC", "cellBit": "c"}


@dataclass(frozen=True)
class PerLayerConfig:
    """A hardware point whose mapped layers may differ from a uniform `base` in LAYER_FIELDS.

    `overrides` lists (layer pattern, ((field, value), ...)) in order; a pattern is a layer name or an
    fnmatch pattern (``features.*``), and where several match one layer the later one wins. Build it with
    `layered` (which returns the base itself when nothing is overridden). Every field's value is checked
    against the base as a whole point, so an error names the layer pattern, the field and the value.
    Chip-wide attributes (the device fields, adc_mode, has_device_error, ...) read through to the base;
    the per-layer fields have no single value: `for_layer(name)` gives a layer's effective HWConfig.
    """

    base: HWConfig
    overrides: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.base, HWConfig):
            raise ConfigError(f"a per-layer point needs an HWConfig as its base, not {type(self.base).__name__}")
        for pattern, fields in self.overrides:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(f"layer override {pattern!r}: a layer name or pattern must be a non-empty string")
            for field, _value in fields:
                if field not in LAYER_FIELDS:
                    chip_wide = field in {f.name for f in dataclasses.fields(HWConfig)}
                    raise ConfigError(
                        f"layer override {pattern!r}: {field!r} "
                        + ("describes the whole chip and cannot differ per layer" if chip_wide
                           else "is not a hardware parameter")
                        + f"; per-layer fields: {', '.join(LAYER_FIELDS)}")
            trial = {**self.base.to_dict(), **dict(fields)}
            problems = validation_problems(trial)
            if problems:
                field, value, why = problems[0]
                raise ConfigError(f"layer override {pattern!r}: {field}={value!r}: {why}")

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the class lacks: chip-wide ones read through to the base.
        if name.startswith("_") or name in ("base", "overrides"):
            raise AttributeError(name)
        if name in LAYER_FIELDS:
            raise AttributeError(f"{name} differs per layer in a per-layer point: use for_layer(name).{name} "
                                 f"(or .base.{name} for the uniform value)")
        return getattr(self.base, name)

    @property
    def override_map(self) -> dict[str, dict[str, int]]:
        return {pattern: dict(fields) for pattern, fields in self.overrides}

    def for_layer(self, name: str) -> HWConfig:
        """The effective hardware point of one mapped layer: the base with every matching override applied."""
        changes: dict[str, int] = {}
        for pattern, fields in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                changes.update(fields)
        return dataclasses.replace(self.base, **changes) if changes else self.base

    def check_layers(self, layers: Sequence[str]) -> None:
        """ConfigError when a pattern matches none of the mapped `layers` (a typo would silently do nothing)."""
        check_layer_patterns([pattern for pattern, _ in self.overrides], layers)

    def canonical(self) -> PerLayerConfig:
        return dataclasses.replace(self, base=self.base.canonical())

    def to_dict(self) -> dict[str, Any]:
        """The base's fields plus "layers": {pattern: {field: value}} (what records store as `config`)."""
        return {**self.base.to_dict(), "layers": self.override_map}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PerLayerConfig | HWConfig:
        values = dict(values)
        layers = values.pop("layers", None) or {}
        if not isinstance(layers, dict):
            raise ConfigError(f"per-layer overrides must map layer patterns to {{field: value}}, not {layers!r}")
        return layered(HWConfig.from_dict(values), layers)

    def key(self) -> str:
        """The base's key and the overrides: never equal to a uniform point's key."""
        parts = [f"{pattern}:" + ",".join(f"{field}={value}" for field, value in fields)
                 for pattern, fields in self.overrides]
        return f"{self.base.canonical().key()};layers=" + ";".join(parts)

    def describe(self) -> str:
        parts = [f"{pattern}: " + " ".join(f"{_LAYER_FIELD_TAGS[field]}{value}" for field, value in fields)
                 for pattern, fields in self.overrides]
        return f"{self.base.describe()} | layers {'; '.join(parts)}"


def layered(base: HWConfig, overrides: Mapping[str, Mapping[str, Any]] | None) -> HWConfig | PerLayerConfig:
    """`base` with per-layer overrides ({layer pattern: {field: value}}, in order); fields equal to the
    base's are dropped, and with nothing left the uniform `base` itself is returned, so one point has one
    key whichever way it was written."""
    if not isinstance(base, HWConfig):
        raise ConfigError(f"per-layer overrides apply to a uniform HWConfig, not {type(base).__name__}")
    base_values = base.to_dict()
    kept: list[tuple[str, tuple[tuple[str, int], ...]]] = []
    for pattern, fields in (overrides or {}).items():
        if not isinstance(fields, Mapping):
            raise ConfigError(f"layer override {pattern!r}: expected {{field: value}}, not {fields!r}")
        changed = tuple((field, value) for field, value in fields.items()
                        if field not in base_values or base_values[field] != value)
        if changed:
            kept.append((pattern, changed))
    if not kept:
        return base
    return PerLayerConfig(base, tuple(kept))


def check_layer_patterns(patterns: Sequence[str], layers: Sequence[str]) -> None:
    """ConfigError when a layer pattern matches none of the mapped `layers`."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise ConfigError(f"layer override {pattern!r} matches no mapped layer; mapped layers: "
                              f"{', '.join(layers) or '(none)'}")


def config_from_dict(values: Mapping[str, Any]) -> HWConfig | PerLayerConfig:
    """A record's `config`: a uniform HWConfig, or a PerLayerConfig when it has "layers"."""
    if "layers" in values:
        return PerLayerConfig.from_dict(dict(values))
    return HWConfig.from_dict(dict(values))


def parse_layer_overrides(texts: Sequence[str]) -> dict[str, dict[str, int]]:
    """Command-line overrides, each ``PATTERN:FIELD=VALUE[,FIELD=VALUE...]`` (e.g. ``conv1:ADCprecision=7``),
    into {pattern: {field: value}}; a UserError names the text that does not parse."""
    overrides: dict[str, dict[str, int]] = {}
    for text in texts:
        pattern, colon, assignments = text.rpartition(":")
        if not colon or not pattern.strip() or not assignments.strip():
            raise ConfigError(f"--layer_override {text!r}: expected LAYER:FIELD=VALUE[,FIELD=VALUE...], "
                              "e.g. conv1:ADCprecision=7")
        fields = overrides.setdefault(pattern.strip(), {})
        for item in assignments.split(","):
            field, equals, raw = item.partition("=")
            field = field.strip()
            if not equals or field not in LAYER_FIELDS:
                raise ConfigError(f"--layer_override {text!r}: {item.strip()!r} is not FIELD=VALUE with FIELD one "
                                  f"of {', '.join(LAYER_FIELDS)}")
            try:
                fields[field] = _parse_choice(raw, field)
            except ValueError:
                raise ConfigError(f"--layer_override {text!r}: {field} = {raw.strip()!r}: must be an integer") from None
    return overrides


_INT_FIELDS = {"wl_weight", "wl_input", "subArray", "ADCprecision", "cellBit"}
_FLOAT_FIELDS = {"onoffratio", "vari", "ind_vari", "laplace_b", "SAF_prop"}


def validation_problems(values: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Every senseless value in one point, as (field, value, reason)."""
    problems: list[tuple[str, Any, str]] = []

    def bad(field: str, why: str) -> None:
        problems.append((field, values.get(field), why))

    lower_bounds = {"wl_weight": 2, "wl_input": 2, "subArray": 1, "ADCprecision": 1, "cellBit": 1}
    upper_bounds = {"wl_weight": 16, "wl_input": 16, "ADCprecision": 24, "cellBit": 8}
    for field in _INT_FIELDS:
        value = values.get(field)
        if isinstance(value, bool) or not isinstance(value, int):
            bad(field, "must be an integer")
            continue
        if value < lower_bounds[field]:
            bad(field, f"must be at least {lower_bounds[field]}")
        elif field in upper_bounds and value > upper_bounds[field]:
            bad(field, f"must be at most {upper_bounds[field]}")
    for field in _FLOAT_FIELDS:
        value = values.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(field, "must be a finite number")
            continue
        if field == "onoffratio":
            if value <= 1:
                bad(field, "on/off ratio G_max/G_min must be greater than 1")
        elif field == "SAF_prop":
            if not 0 <= value <= 0.5:
                bad(field, "stuck-at probability must lie in [0, 0.5] (SA0 and SA1 each have it)")
        elif value < 0:
            bad(field, "a spread cannot be negative")
    if values.get("vari_type") not in VARI_TYPES:
        bad("vari_type", f"must be one of {', '.join(VARI_TYPES)}")
    if values.get("adc_mode") not in ADC_MODES:
        bad("adc_mode", f"must be one of {', '.join(ADC_MODES)}")
    weight_bits, cell_bits = values.get("wl_weight"), values.get("cellBit")
    if isinstance(weight_bits, int) and isinstance(cell_bits, int) and cell_bits > weight_bits - 1 >= 1:
        bad("cellBit", f"a {cell_bits}-bit cell cannot slice the {weight_bits - 1} magnitude bits of "
                       f"wl_weight={weight_bits}")
    return problems


def _parse_choice(raw: str, field: str) -> Any:
    text = raw.strip()
    if field in _INT_FIELDS:
        number = float(text)  # accepts "8" and "8.0"; "8.5" is rejected below
        if not number.is_integer():
            raise ValueError("not an integer")
        return int(number)
    if field in _FLOAT_FIELDS:
        return float(text)
    return text


@dataclass
class SearchSpace:
    """The choices of every hardware parameter, read from an INI file."""

    choices: dict[str, list[Any]]
    source: str = "<defaults>"
    # Cost-only knobs (COST_KNOBS) and [Cost] coefficient overrides: read and checked here, used by
    # nipa.hardware.cost and nipa.pipelines.explore only.
    cost_choices: dict[str, list[int]] = dataclasses.field(default_factory=lambda: {
        key: [default] for key, default in COST_KNOBS.items()})
    cost_overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    # skip_unsliceable: (wl_weight, cellBit) pairs whose cell is wider than the weight's magnitude are
    # left out (listed in skipped_pairs) instead of rejecting the file; see from_ini.
    skip_unsliceable: bool = False
    skipped_pairs: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_ini(cls, path: str | Path, skip_unsliceable: bool = False) -> SearchSpace:
        """Read and check a search-space INI file.

        skip_unsliceable: a (wl_weight, cellBit) pair whose cell is wider than the weight's magnitude
        bits is recorded in `skipped_pairs` instead of rejecting the file (the exploration space crosses
        wide ranges of both). grid() and sample() still refuse such a space's invalid points: nipa.pipelines.explore
        builds its grid without them.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"search-space file {path} does not exist")
        # No interpolation: a '%' in a value is the value, not configparser's %(name)s syntax.
        parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
        parser.optionxform = str  # keep the original's key spelling (ADCprecision, cellBit)
        try:
            text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is accepted
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the INI file as UTF-8") from None
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise ConfigError(f"{path}: not a valid INI file: {exc}") from exc
        if not any(parser.items(section) for section in parser.sections()):
            raise ConfigError(f"{path}: no hardware parameter in the file (an empty search space would run "
                              f"one default point); list choices under {', '.join(f'[{s}]' for s in INI_LAYOUT)}"
                              " (see HW_config/Search_space.ini)")

        defaults = HWConfig().to_dict()
        choices: dict[str, list[Any]] = {field: [defaults[field]] for field in defaults}
        where: dict[str, str] = {}
        cost_choices: dict[str, list[int]] = {key: [default] for key, default in COST_KNOBS.items()}
        cost_overrides: dict[str, float] = {}
        for section in parser.sections():
            if section == COST_SECTION:
                cost_overrides = _read_cost_section(path, parser.items(section))
                continue
            if section == "Hardware_Level":
                for key, raw in parser.items(section):
                    if key in COST_KNOBS:
                        cost_choices[key] = _read_cost_knob(path, section, key, raw)
            if section not in INI_LAYOUT:
                raise ConfigError(f"{path}: unknown section [{section}]; expected {', '.join(INI_LAYOUT)}")
            for key, raw in parser.items(section):
                layout = INI_LAYOUT[section]
                if section == "Hardware_Level" and key in COST_KNOBS:
                    continue  # read above
                if key not in layout:
                    raise ConfigError(
                        f"{path}: [{section}] unknown key {key!r} (= {raw!r}); "
                        f"expected one of {', '.join(layout)}")
                field = layout[key]
                values = []
                for item in raw.split(","):
                    if not item.strip():
                        raise ConfigError(f"{path}: [{section}] {key} = {raw!r}: empty choice in the list")
                    try:
                        values.append(_parse_choice(item, field))
                    except ValueError:
                        kind = "an integer" if field in _INT_FIELDS else "a number"
                        raise ConfigError(
                            f"{path}: [{section}] {key} = {item.strip()!r}: must be {kind}") from None
                choices[field] = list(dict.fromkeys(values))  # drop repeated choices, keep order
                where[field] = f"[{section}] {key}"

        space = cls(choices=choices, source=str(path), cost_choices=cost_choices,
                    cost_overrides=cost_overrides, skip_unsliceable=skip_unsliceable)
        space._check(where)
        space._warn_unused_spreads(where)
        return space

    def _warn_unused_spreads(self, where: dict[str, str]) -> None:
        """Several choices of a spread whose variation type no point uses would be dropped silently (they
        do not multiply the grid): warn. One value, as in the original's INI files, stays quiet."""
        for vari_type, spread in SPREAD_OF_TYPE.items():
            if vari_type not in self.choices["vari_type"] and len(self.choices[spread]) > 1:
                warnings.warn(f"{self.source}: {where.get(spread, spread)} = {self.choices[spread]} is ignored: "
                              f"it is the spread of vari_type {vari_type}, which vari_type = "
                              f"{', '.join(self.choices['vari_type'])} does not list", stacklevel=3)

    def _check(self, where: dict[str, str]) -> None:
        """Reject every senseless choice, naming file, section, key and value."""
        defaults = HWConfig().to_dict()
        for field, values in self.choices.items():
            for value in values:
                trial = dict(defaults)
                trial[field] = value
                if field == "wl_weight":  # check bits alone, the cellBit pairing is checked below
                    trial["cellBit"] = 1
                for bad_field, bad_value, why in validation_problems(trial):
                    if bad_field == field:
                        raise ConfigError(
                            f"{self.source}: {where.get(field, field)} = {bad_value!r}: {why}")
        self.skipped_pairs = []
        for weight_bits in self.choices["wl_weight"]:
            for cell_bits in self.choices["cellBit"]:
                if cell_bits > weight_bits - 1 and self.skip_unsliceable:
                    self.skipped_pairs.append((weight_bits, cell_bits))
                elif cell_bits > weight_bits - 1:
                    raise ConfigError(
                        f"{self.source}: {where.get('cellBit', 'cellBit')} = {cell_bits}: a {cell_bits}-bit "
                        f"cell cannot slice the {weight_bits - 1} magnitude bits of wl_weight={weight_bits} "
                        f"({where.get('wl_weight', 'wl_weight')})")

    def sliceable_pairs(self) -> list[tuple[int, int]]:
        """The (wl_weight, cellBit) pairs of the grid that a cell can slice (all but skipped_pairs)."""
        return [(w, c) for w in self.choices["wl_weight"] for c in self.choices["cellBit"]
                if (w, c) not in self.skipped_pairs]

    def grid(self) -> list[HWConfig]:
        """Every distinct point, in a stable order. Spreads that do not belong to a point's
        variation type are ignored, so they do not multiply the grid."""
        fields = list(self.choices)
        points: dict[HWConfig, None] = {}
        for combo in itertools.product(*(self.choices[f] for f in fields)):
            points[HWConfig(**dict(zip(fields, combo, strict=True))).canonical()] = None
        return list(points)

    def _blocks(self) -> tuple[list[str], list[tuple[str, list[str]]]] | None:
        """The grid's order as (prefix fields, [(vari_type, its inner fields)]): grid() lists, for every
        combination of the prefix fields (those before vari_type), each variation type in turn with the
        combinations of the fields after it, the other types' spreads left out (they are zero). None when
        the fields are not in that layout (a space built by hand): then only grid() knows the order."""
        fields = list(self.choices)
        if "vari_type" not in fields:
            return None
        at = fields.index("vari_type")
        prefix, suffix = fields[:at], fields[at + 1:]
        if any(f in SPREAD_OF_TYPE.values() for f in prefix):
            return None
        blocks = [(v, [f for f in suffix if f not in SPREAD_OF_TYPE.values() or f == SPREAD_OF_TYPE[v]])
                  for v in self.choices["vari_type"]]
        return prefix, blocks

    def size(self) -> int:
        """The number of distinct points, len(grid()), computed without building the grid."""
        layout = self._blocks()
        if layout is None:
            return len(self.grid())
        prefix, blocks = layout
        inner = sum(math.prod(len(self.choices[f]) for f in fields) for _, fields in blocks)
        return math.prod(len(self.choices[f]) for f in prefix) * inner

    def point(self, index: int) -> HWConfig:
        """grid()[index], computed without building the grid (mixed-radix digits of the index)."""
        layout = self._blocks()
        if layout is None:
            return self.grid()[index]
        prefix, blocks = layout
        inner_sizes = [math.prod(len(self.choices[f]) for f in fields) for _, fields in blocks]
        outer, offset = divmod(index, sum(inner_sizes))
        values: dict[str, Any] = {}
        for field in reversed(prefix):
            outer, digit = divmod(outer, len(self.choices[field]))
            values[field] = self.choices[field][digit]
        block = 0
        while offset >= inner_sizes[block]:  # which variation type's block the offset falls in
            offset -= inner_sizes[block]
            block += 1
        values["vari_type"], fields = blocks[block]
        for field in reversed(fields):
            offset, digit = divmod(offset, len(self.choices[field]))
            values[field] = self.choices[field][digit]
        return HWConfig(**values).canonical()

    def sample(self, n: int, seed: int = 0) -> list[HWConfig]:
        """`n` distinct points drawn without replacement (seeded); the whole grid when n == 0 or
        n >= its size. Unlike the original (random draws, duplicates dropped afterwards), asking for
        n points gives n points. The draw picks indices into the grid, so a large grid is never built
        whole; the points are those random.Random(seed).sample(grid(), n) gives."""
        if n < 0:
            raise ConfigError(f"cannot sample {n} points: give a positive number, or 0 for the whole grid")
        size = self.size()
        if n == 0 or n >= size:
            return self.grid()
        return [self.point(i) for i in random.Random(seed).sample(range(size), n)]

    def __len__(self) -> int:
        return self.size()



def _read_cost_knob(path: Path, section: str, key: str, raw: str) -> list[int]:
    """The choices of one cost-only knob: whole numbers >= 1; crossbar_columns even (a weight takes a
    differential pair of columns)."""
    values: list[int] = []
    for item in raw.split(","):
        text = item.strip()
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not text or not math.isfinite(number) or not number.is_integer() or number < 1:
            raise ConfigError(f"{path}: [{section}] {key} = {text!r}: must be a whole number of at least 1")
        if key == "crossbar_columns" and int(number) % 2:
            raise ConfigError(f"{path}: [{section}] {key} = {text!r}: must be even (each weight slice takes "
                              "a differential pair of columns)")
        values.append(int(number))
    return list(dict.fromkeys(values))


def _read_cost_section(path: Path, items: list[tuple[str, str]]) -> dict[str, float]:
    """[Cost] overrides of the cost model's coefficients: known names, one positive number each."""
    from nipa.hardware.cost import CostCoefficients  # lazy: nipa.hardware.cost uses this module's HWConfig

    known = CostCoefficients.names()
    overrides: dict[str, float] = {}
    for key, raw in items:
        if key not in known:
            raise ConfigError(f"{path}: [{COST_SECTION}] unknown key {key!r} (= {raw!r}); expected one of "
                              f"{', '.join(known)}")
        try:
            value = float(raw.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{path}: [{COST_SECTION}] {key} = {raw.strip()!r}: must be one positive number")
        overrides[key] = value
    return overrides

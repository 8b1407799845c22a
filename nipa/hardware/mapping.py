"""Which layers of a model are mapped to crossbars: the one selection rule every script uses.

Mapped: `nn.Conv2d` with groups == 1, `nn.Linear` and transformers' `Conv1D` (the GPT-2 family's linear
layer, weight stored [in, out]; converted layers treat it as the equivalent `nn.Linear`). Depthwise and
grouped convolutions stay digital.
Name patterns are shell-style globs (fnmatch) matched against the qualified module name; a pattern also
matches everything below it, so `layer1` selects `layer1.0.conv1` too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from nipa.errors import UserError


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (a linear layer despite the name), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_mappable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_transformers_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def as_linear(module: nn.Module) -> nn.Module:
    """A transformers `Conv1D` as the equivalent `nn.Linear` (weight transposed, same device and dtype);
    any other module unchanged."""
    if not is_transformers_conv1d(module):
        return module
    fan_in, out_features = module.weight.shape
    linear = nn.Linear(fan_in, out_features, bias=module.bias is not None,
                       device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def select_layers(
    model: nn.Module, exclude: Sequence[str] = (), include: Sequence[str] | None = None
) -> list[str]:
    """Qualified names of the layers to map, in model order.

    `include` (patterns) restricts the candidates, `exclude` removes from them. A pattern that matches
    no mappable layer is an error: a typo must not silently map everything.
    """
    candidates = [name for name, module in model.named_modules() if name and is_mappable(module)]
    for label, patterns in (("include", include or ()), ("exclude", exclude)):
        for pattern in patterns:
            if not any(matches(name, [pattern]) for name in candidates):
                shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
                raise UserError(f"--{label}_layer pattern {pattern!r} matches no mappable layer; "
                                 f"mappable layers: {shown}")
    selected = [n for n in candidates if include is None or not include or matches(n, include)]
    selected = [n for n in selected if not matches(n, exclude)]
    if candidates and not selected:  # nothing mapped: "hardware" results would be the float model's
        raise UserError(f"--include_layer {list(include or [])} --exclude_layer {list(exclude)} leave no layer "
                        f"mapped (of {len(candidates)} mappable); keep at least one layer on the crossbars")
    return selected


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def digital_layers(model: nn.Module, mapped: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, type, why) of every module holding its own weights that stays digital."""
    chosen = set(mapped)
    kept = []
    for name, module in model.named_modules():
        if not name or name in chosen or not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = type(module).__name__
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            why = f"grouped/depthwise convolution (groups={module.groups}): not mapped to crossbars"
        elif is_mappable(module):
            why = "left out by --exclude_layer / --include_layer"
        else:
            why = "not an nn.Linear or nn.Conv2d"
        kept.append((name, kind, why))
    return kept


def digital_report(model: nn.Module, mapped: Sequence[str], shown: int = 20) -> str:
    """The modules with weights that stay digital and why, for the log after the mapping report."""
    kept = digital_layers(model, mapped)
    lines = [f"{len(kept)} module(s) with weights stay digital" + (":" if kept else "")
             + ("" if kept else " (besides activations, pooling and every other operation)")]
    lines += [f"  {name:<48} {kind:<12} {why}" for name, kind, why in kept[:shown]]
    if len(kept) > shown:
        lines.append(f"  ... and {len(kept) - shown} more")
    if kept:
        lines.append("  activations, pooling, residual additions and every other operation run digitally too")
    return "\n".join(lines)

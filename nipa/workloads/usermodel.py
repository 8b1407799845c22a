"""A user's own PyTorch classifier, given by file: the model half of a user workload (nipa.workloads.workload).

`--model_name` names one when it is
- `path/to/file.py:ClassName`: the file is imported by its path (importlib, not as part of a package, so
  the package's other imports are never run), the class built with `--model_kwargs` (JSON) and the weights
  of `--ckpt` loaded: a plain state dict or a checkpoint dict holding one under `state_dict`,
  `model_state_dict` or `model`, read with `weights_only=True` (no code runs);
- `model.pt2`: a `torch.export` program; its `aten.linear` / `aten.conv2d` calls on its own weights are
  turned back into `nn.Linear` / `nn.Conv2d` modules so that they can be mapped;
- `model.pt`: TorchScript. Its compiled forward calls its layers directly, so they cannot be replaced by
  crossbar layers; a scripted `nn.Sequential` of standard layers is rebuilt as an eager one, anything else
  is refused with a message saying how to give the model instead;
- a full pickled module (`.pt`, `.pth`, `.pkl` that is not TorchScript) only with `--allow_pickle`: loading
  a pickle runs code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nipa.errors import UserError

PYTHON_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<cls>[A-Za-z_][A-Za-z0-9_]*)$")
FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".pkl")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def is_user_model_name(name: str) -> bool:
    """True when `--model_name` names a user's model file (see the module docstring)."""
    return bool(PYTHON_SPEC.match(name)) or Path(name).suffix.lower() in FILE_SUFFIXES


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_model_id(name: str) -> str:
    """The model's name in result paths and records: `{file stem}_{class}` or the file stem, lower case."""
    match = PYTHON_SPEC.match(name)
    if match:
        return f"{Path(match['file']).stem}_{match['cls']}".lower()
    return Path(name).stem.lower()


def parse_model_kwargs(text: str | dict | None) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--model_kwargs {text!r}: not JSON ({exc.msg}); e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--model_kwargs {text!r}: a JSON object of keyword arguments, e.g. '{{\"num_classes\": 10}}'")
    return value


@contextlib.contextmanager
def _folder_on_path(folder: Path) -> Iterator[None]:
    """The model file's own folder importable while it runs (a file that imports its siblings)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def import_model_class(file: str | Path, class_name: str) -> type[nn.Module]:
    """The class `class_name` of the Python file `file`, imported by path."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"--model_name {file}:{class_name}: no such file {path}"
                        + (" (it is a directory)" if path.is_dir() else ""))
    module_name = f"nipa_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"--model_name {file}:{class_name}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        with _folder_on_path(path.resolve().parent):
            spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error it raises is theirs to fix
        raise UserError(f"--model_name {file}:{class_name}: importing {path} failed ({type(exc).__name__}: {exc})"
                        ) from None
    found = getattr(module, class_name, None)
    modules = sorted(n for n, v in vars(module).items()
                     if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module_name)
    if found is None:
        raise UserError(f"--model_name {file}:{class_name}: {path} defines no {class_name!r}; its nn.Module "
                        f"classes: {', '.join(modules) or 'none'}")
    if not (inspect.isclass(found) and issubclass(found, nn.Module)):
        raise UserError(f"--model_name {file}:{class_name}: {class_name!r} is not an nn.Module class; its nn.Module "
                        f"classes: {', '.join(modules) or 'none'}")
    return found


def _read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    if not ckpt.is_file():
        raise UserError(f"--ckpt {ckpt}: no such file" + (" (it is a directory)" if ckpt.is_dir() else ""))
    try:
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and runtime errors of a foreign or damaged file
        first = str(exc).splitlines()[0] if str(exc) else "damaged file"
        raise UserError(f"--ckpt {ckpt}: cannot be read as weights ({type(exc).__name__}: {first[:300]}); give a "
                        "state dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    if isinstance(payload, dict):
        for key in STATE_DICT_KEYS:
            inner = payload.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    kind = f"a dict with keys {sorted(map(str, payload))[:10]}" if isinstance(payload, dict) else type(payload).__name__
    raise UserError(f"--ckpt {ckpt}: holds {kind}, not a state dict (nor one under "
                    f"{', '.join(STATE_DICT_KEYS)})")


def load_fitting_state_dict(model: nn.Module, ckpt: str | Path) -> None:
    """Load `ckpt` into `model`, or a UserError listing missing and unexpected keys and shape mismatches."""
    ckpt = Path(ckpt)
    state = _read_state_dict(ckpt)
    own = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from nn.DataParallel
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)}, model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def listed(items: list[str]) -> str:
            return ", ".join(items[:10]) + (f" ... ({len(items)} in all)" if len(items) > 10 else "")
        parts = [f"missing keys: {listed(missing)}" if missing else "",
                 f"unexpected keys: {listed(unexpected)}" if unexpected else "",
                 f"shape mismatches: {listed(shapes)}" if shapes else ""]
        raise UserError(f"--ckpt {ckpt} does not fit the model ({type(model).__name__}): "
                        + "; ".join(p for p in parts if p)
                        + "; give the checkpoint of this model, or the --model_kwargs it was built with")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# torch.export programs: linear/conv2d calls back into modules
# ----------------------------------------------------------------------------------------------------


def _attr_target(node: Any) -> str | None:
    return node.target if getattr(node, "op", None) == "get_attr" else None


def modules_from_export(graph_module: nn.Module) -> list[str]:
    """Turn each `aten.linear` / `aten.conv2d` call on the program's own weights into a call of an
    `nn.Linear` / `nn.Conv2d` module holding them (registered where the weights were), so that the
    crossbar conversion finds and replaces them. Returns the names of the modules made."""
    graph = graph_module.graph
    ops = torch.ops.aten
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for arg in node.args:
            target = _attr_target(arg)
            if target is not None:
                uses[target] = uses.get(target, 0) + 1
    made: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (ops.linear.default, ops.conv2d.default):
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        weight_name, bias_name = _attr_target(args[1]), _attr_target(args[2])
        if weight_name is None or (args[2] is not None and bias_name is None) or node.kwargs:
            continue
        if uses.get(weight_name, 0) != 1 or (bias_name is not None and uses.get(bias_name, 0) != 1):
            continue  # a shared weight stays as it is (digital)
        owner, _, leaf = weight_name.rpartition(".")
        if leaf != "weight" or (bias_name is not None and bias_name != f"{owner}.bias") or not owner:
            continue
        container = graph_module.get_submodule(owner)
        if list(container.children()) or set(dict(container.named_parameters(recurse=False))) - {"weight", "bias"}:
            continue
        weight = container.weight
        bias = getattr(container, "bias", None) if bias_name is not None else None
        if node.target == ops.linear.default:
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1)
            if isinstance(padding, str):
                continue
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        parent_name, _, child = owner.rpartition(".")
        parent = graph_module.get_submodule(parent_name) if parent_name else graph_module
        setattr(parent, child, layer)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        made.append(owner)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return made


# ----------------------------------------------------------------------------------------------------
# TorchScript: only a scripted Sequential of standard layers can be rebuilt eagerly
# ----------------------------------------------------------------------------------------------------


def _eager_linear(m: Any) -> nn.Module:
    return nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)


def _eager_conv(m: Any) -> nn.Module:
    return nn.Conv2d(m.in_channels, m.out_channels, tuple(m.kernel_size), stride=tuple(m.stride),
                     padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                     dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None,
                     padding_mode=m.padding_mode)


def _eager_batchnorm(kind: type[nn.Module]):
    return lambda m: kind(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                          track_running_stats=m.track_running_stats)


# Standard layers whose hyper-parameters a scripted module keeps as attributes.
_EAGER = {
    "Linear": _eager_linear, "Conv2d": _eager_conv,
    "BatchNorm1d": _eager_batchnorm(nn.BatchNorm1d), "BatchNorm2d": _eager_batchnorm(nn.BatchNorm2d),
    "ReLU": lambda m: nn.ReLU(), "ReLU6": lambda m: nn.ReLU6(), "GELU": lambda m: nn.GELU(),
    "Sigmoid": lambda m: nn.Sigmoid(), "Tanh": lambda m: nn.Tanh(), "Identity": lambda m: nn.Identity(),
    "Dropout": lambda m: nn.Dropout(m.p), "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim),
    "MaxPool2d": lambda m: nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode),
    "AvgPool2d": lambda m: nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode),
    "AdaptiveAvgPool2d": lambda m: nn.AdaptiveAvgPool2d(m.output_size),
}


def _rebuild(scripted: Any) -> nn.Module | None:
    kind = getattr(scripted, "original_name", type(scripted).__name__)
    if kind == "Sequential":
        children = [_rebuild(child) for _, child in scripted.named_children()]
        return None if any(c is None for c in children) else nn.Sequential(*children)
    make = _EAGER.get(kind)
    return None if make is None else make(scripted)


def eager_from_torchscript(scripted: Any, path: Path) -> nn.Module:
    """An eager copy of a scripted Sequential of standard layers, or a UserError saying what to do."""
    eager = None
    with contextlib.suppress(Exception):  # attributes a scripted layer does not expose: not rebuildable
        eager = _rebuild(scripted)
    if eager is not None:
        eager.load_state_dict(scripted.state_dict())
        return eager
    layers = [name for name, m in scripted.named_modules()
              if getattr(m, "original_name", "") in ("Linear", "Conv2d")]
    raise UserError(
        f"--model_name {path}: a TorchScript module's compiled forward calls its layers directly, so its "
        f"Linear/Conv2d layers ({', '.join(layers[:10]) or 'none found'}) cannot be replaced by crossbar layers "
        "(only a scripted nn.Sequential of standard layers is rebuilt). Give the model as torch.export instead "
        "(torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2')) or as its class: "
        "--model_name file.py:ClassName --ckpt weights.pth (torch.save(torch.jit.load(path).state_dict(), "
        "'weights.pth'))")


def load_user_model(name: str, *, ckpt: str | Path | None = None, model_kwargs: str | dict | None = None,
                    allow_pickle: bool = False, random_init: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The user's model (eval mode, on the CPU) and its description for records: file, class, format,
    file sha256, keyword arguments, checkpoint and checkpoint sha256."""
    kwargs = parse_model_kwargs(model_kwargs)
    match = PYTHON_SPEC.match(name)
    if match:
        cls = import_model_class(match["file"], match["cls"])
        try:
            model = cls(**kwargs)
        except Exception as exc:  # the user's constructor
            raise UserError(f"--model_name {name}: {match['cls']}(**{kwargs}) failed ({type(exc).__name__}: {exc}); "
                            "give its arguments with --model_kwargs '{\"name\": value}'") from None
        if ckpt is not None:
            load_fitting_state_dict(model, ckpt)
        elif not random_init:
            raise UserError(f"--model_name {name}: give its weights with --ckpt weights.pth (a state dict)")
        description = {"kind": "user", "format": "python", "file": str(Path(match["file"]).resolve()),
                       "class": match["cls"], "file_sha256": file_sha256(match["file"])}
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"--model_name {name}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
        if kwargs:
            raise UserError(f"--model_kwargs: {path} is a saved model; keyword arguments apply to file.py:ClassName")
        model, kind = _load_saved_module(path, allow_pickle)
        if ckpt is not None:
            load_fitting_state_dict(model, ckpt)
        description = {"kind": "user", "format": kind, "file": str(path.resolve()), "class": None,
                       "file_sha256": file_sha256(path)}
    description.update({"kwargs": kwargs, "checkpoint": None if ckpt is None else str(Path(ckpt).resolve()),
                        "checkpoint_sha256": None if ckpt is None else file_sha256(ckpt)})
    return model.eval(), description


def _keep_traced_mode(module: nn.Module, mode: bool = True) -> nn.Module:
    return module


def _load_saved_module(path: Path, allow_pickle: bool) -> tuple[nn.Module, str]:
    if path.suffix.lower() == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # a foreign or damaged file
            raise UserError(f"--model_name {path}: not a torch.export program ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else 'damaged file'})") from None
        module = program.module()
        modules_from_export(module)
        # An exported program is traced in one mode (export it in eval mode) and refuses .eval()/.train();
        # every evaluator calls .eval(), so both keep the traced mode instead.
        module.train = types.MethodType(_keep_traced_mode, module)
        module.eval = types.MethodType(_keep_traced_mode, module)
        return module, "export"
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not TorchScript: perhaps a pickled module, which only --allow_pickle may load
        scripted = None
    if scripted is not None:
        return eager_from_torchscript(scripted, path), "torchscript"
    if not allow_pickle:
        raise UserError(f"--model_name {path}: not TorchScript nor torch.export; if it is a full pickled module "
                        "(torch.save(model)), loading it runs code: pass --allow_pickle if you trust the file, or "
                        "give --model_name file.py:ClassName --ckpt weights.pth")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # the pickle's own classes may be missing
        raise UserError(f"--model_name {path}: the pickled module cannot be loaded ({type(exc).__name__}: {exc}); "
                        "its classes must be importable") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"--model_name {path}: holds a {type(module).__name__}, not an nn.Module")
    return module, "pickle"

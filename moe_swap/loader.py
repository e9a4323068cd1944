"""``moe_swap.load(path)``: build a MoE model from a safetensors folder without materialising it.

The model is built on the meta device; non-expert tensors are read straight to the device; each
streamed expert tensor is read (plain file reads: no whole-file mapping resident in the process) and
written into its place in the HostStore before the next is read, so resident memory stays near the
HostStore plus one tensor. Layers the planner keeps resident are assembled and moved to the device.
Peak host memory during the load is measured.

Checkpoint names (transformers 5.x models): transformers' own loading rules for the model
(``transformers.conversion_mapping.get_model_conversion_mapping``: its renamings and weight converters, e.g.
per-expert ``experts.{e}.gate_proj.weight`` merged into ``experts.gate_up_proj``), so a family gets the names
transformers gives it. Expert tensors whose rule is a per-expert merge (``MergeModulelist``, then
``Concatenate`` of gate and up) go into place one expert at a time; any other rule for experts runs
transformers' operations on the layer's tensors (one layer in host memory). transformers 4.x: the six
families' per-expert names (:class:`moe_swap.models.Family`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from . import models
from .offload import _check_device, _check_policy_and_mode, _check_schedule, _offload, check_dtype
from .models import Family, MoELayer
from .streamer import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = ["load", "CheckpointIndex", "peak_host_memory"]

# Float8 checkpoint tensors come with block scales: read them only as quantized experts (not yet).
_DTYPES = {code: dtype for code, dtype in SAFETENSORS_DTYPES.items()
           if code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")}


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class CheckpointIndex:
    """Every tensor of a safetensors folder (one file or shards): name -> file, dtype, shape, offset."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path={path!r} is not a folder (expected config.json + *.safetensors)")
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_file):
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path!r}")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self._read_header(os.path.join(path, name))

    def _read_header(self, file: str) -> None:
        data_start, header = read_safetensors_header(file)
        for key, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{file}: tensor {key!r} has dtype {info['dtype']}, which moe_swap cannot read")
            begin, end = info["data_offsets"]
            self.entries[key] = _Entry(file, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin,
                                       end - begin)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read one tensor into ``out`` (a contiguous CPU tensor of its shape), converting dtype if needed."""
        entry = self.entries[key]
        if tuple(out.shape) != entry.shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {list(entry.shape)}, the model expects "
                             f"{list(out.shape)}")
        target = out if out.dtype == entry.dtype else torch.empty(entry.shape, dtype=entry.dtype)
        buffer = memoryview(target.view(-1).view(torch.uint8).numpy()) if entry.nbytes else memoryview(b"")
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            if f.readinto(buffer) != entry.nbytes:
                raise ValueError(f"checkpoint tensor {key!r} in {entry.file} is truncated")
        if target is not out:
            out.copy_(target)

    def read(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        entry = self.entries[key]
        out = torch.empty(entry.shape, dtype=dtype or entry.dtype)
        self.read_into(key, out)
        return out


def _reset_peak_host_memory() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_host_memory() -> int:
    """This process's peak resident memory in bytes (VmHWM), or the current RSS where /proc lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def _current_host_memory() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _checkpoint_dtype(config, index: CheckpointIndex) -> torch.dtype:
    for attr in ("dtype", "torch_dtype"):
        value = getattr(config, attr, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    for entry in index.entries.values():
        if entry.dtype.is_floating_point:
            return entry.dtype
    return torch.float32


def _expert_keys(layer: MoELayer, family: Family, index: CheckpointIndex) -> list[str]:
    """The checkpoint keys holding this layer's experts (fused names when present, else per-expert)."""
    fused = list(layer.checkpoint_fused_keys(family))
    if all(k in index for k in fused):
        return fused
    return [k for e in range(layer.num_experts) for k in layer.checkpoint_expert_keys(family, e)]


def _read_layer_experts(layer: MoELayer, family: Family, index: CheckpointIndex,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts as w13 [E, 2I, H] and w2 [E, H, I], read tensor by tensor into place."""
    e_count, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    w13 = torch.empty(e_count, 2 * i, h, dtype=dtype)
    w2 = torch.empty(e_count, h, i, dtype=dtype)
    fused_w13, fused_w2 = layer.checkpoint_fused_keys(family)
    if fused_w13 in index and fused_w2 in index:
        index.read_into(fused_w13, w13)
        index.read_into(fused_w2, w2)
        return w13, w2
    for e in range(e_count):
        gate, up, down = layer.checkpoint_expert_keys(family, e)
        index.read_into(gate, w13[e, :i])
        index.read_into(up, w13[e, i:])
        index.read_into(down, w2[e])
    return w13, w2


def _stream_layer_experts(layer: MoELayer, family: Family, index: CheckpointIndex, dtype: torch.dtype,
                          streamer) -> int:
    """Reserve a streamed layer in the HostStore and fill it one checkpoint tensor at a time."""
    e_count, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    target = streamer.reserve_layer((e_count, 2 * i, h), (e_count, h, i), dtype)
    fused_w13, fused_w2 = layer.checkpoint_fused_keys(family)
    if fused_w13 in index and fused_w2 in index:
        streamer.write(target, "w13", index.read(fused_w13, dtype))
        streamer.write(target, "w2", index.read(fused_w2, dtype))
        return target
    for e in range(e_count):
        gate, up, down = layer.checkpoint_expert_keys(family, e)
        streamer.write(target, "w13", index.read(gate, dtype), expert=e, row=0)
        streamer.write(target, "w13", index.read(up, dtype), expert=e, row=i)
        streamer.write(target, "w2", index.read(down, dtype), expert=e, row=0)
    return target


class _TransformersNames:
    """Checkpoint keys -> the model's tensors by transformers' loading rules for this model: for every model
    tensor, the converter that builds it (None: a renamed or same-named tensor) and its source keys by source
    pattern, in transformers' order (natural key order: expert 2 before expert 10)."""

    def __init__(self, model: nn.Module, index: "CheckpointIndex"):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        meta_state = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.groups: dict[str, tuple[Optional[object], dict[str, list[str]]]] = {}
        for key in sorted(index.entries, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if renamed not in meta_state and key in meta_state:  # as transformers: the name as it is
                renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
            if renamed not in meta_state:
                continue  # e.g. a checkpoint's extra heads; transformers ignores them too
            converter = by_pattern.get(pattern) if pattern is not None else None
            sources = self.groups.setdefault(renamed, (converter, {}))[1]
            sources.setdefault(pattern if converter is not None else key, []).append(key)

    def source_keys(self, target: str) -> list[str]:
        return [k for keys in self.groups[target][1].values() for k in keys] if target in self.groups else []

    def convert(self, target: str, read) -> dict[str, torch.Tensor]:
        """The model tensors built from ``target``'s group (several for a converter that splits), by running
        transformers' operations of its converter on the source tensors (``read(key)``)."""
        converter, sources = self.groups[target]
        if converter is None:
            (key,), = sources.values()
            return {target: read(key)}
        collected = {pattern: [read(k) for k in keys] for pattern, keys in sources.items()}
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns, full_layer_name=target,
                                   model=self.model, config=self.model.config, missing_keys=None)
        # the outputs are named by target pattern: put back the target's prefix and suffix (as transformers does)
        head, _, tail = next((target.partition(k) for k in collected if k in target), ("", "", ""))
        return {head + k + tail: v[0] if isinstance(v, list) else v for k, v in collected.items()}

    def missing_expert_keys(self, layer: MoELayer) -> list[str]:
        """The checkpoint keys a per-expert merge of this layer expects and the checkpoint lacks (named from
        the keys it has: the pattern's ``*`` is the expert index)."""
        missing = []
        for name in (layer.layout.w13_name, "down_proj"):
            converter, sources = self.groups.get(f"{layer.experts_name}.{name}", (None, {}))
            if converter is None or not sources:
                continue
            pattern, keys = next(iter(sources.items()))
            match = re.search(re.escape(pattern).replace(r"\*", r"\d+"), keys[0])
            if match is None or "*" not in pattern:
                continue
            head, tail = keys[0][:match.start()], keys[0][match.end():]
            expected = [head + p.replace("*", str(e)) + tail for p in converter.source_patterns
                        for e in range(layer.num_experts)]
            present = {k for keys in sources.values() for k in keys}
            missing += [k for k in expected if k not in present]
        return missing

    def expert_pieces(self, layer: MoELayer, which: str, read):
        """``(expert, tensor)`` pieces of a 5.x layer's ``which`` ("w13"/"w2") in fused_moe's layout, one expert
        at a time when transformers' rule is a per-expert merge (then concatenation of gate and up), else the
        whole layer from transformers' operations."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        layout = layer.layout
        target = f"{layer.experts_name}.{layout.w13_name if which == 'w13' else 'down_proj'}"
        converter, sources = self.groups[target]
        ops = list(getattr(converter, "operations", ()))
        per_expert = (len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
                      and (len(ops) == 1 and len(sources) == 1
                           or len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1))
        if not per_expert:
            whole = self.convert(target, read)[target]
            yield 0, models.convert_to_fused(layout, which, whole)  # every expert at once
            return
        patterns = [p for p in converter.source_patterns if p in sources]
        for pattern in patterns:
            if len(sources[pattern]) != layer.num_experts:
                raise ValueError(f"checkpoint tensors for {target} ({pattern!r}): {len(sources[pattern])} found, "
                                 f"{layer.num_experts} experts expected")
        for e in range(layer.num_experts):
            native = torch.cat([read(sources[p][e]) for p in patterns], dim=0)
            yield e, models.convert_to_fused(layout, which, native.unsqueeze(0))


def _model_name(key: str, family: Family, names: set[str]) -> Optional[str]:
    """The model's name for a checkpoint key (transformers 5.x renamed Mixtral's block to ``mlp``)."""
    if key in names:
        return key
    renamed = key.replace(f".{family.checkpoint_block}.", ".mlp.")
    return renamed if renamed in names else None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load(
    path: str,
    device: Union[str, torch.device] = "cuda",
    gpu_budget: Union[None, int, str] = None,
    policy: str = "full",
    slots: int = 2,
    prefetch_depth: int = 1,
    mode: str = "full",
    dtype: Union[None, str, torch.dtype] = None,
    eviction: str = "flru",
    predict: bool = False,
    ids_path: str = "host",
    copy_cost: Optional[tuple[float, float]] = None,
):
    """Build a model from a safetensors folder with its experts streamed (see :func:`moe_swap.offload`).

    Args:
        path: a folder with ``config.json`` and ``*.safetensors`` (one file or shards with
            ``model.safetensors.index.json``). transformers 5.x: named as transformers loads the family (its
            own conversion mapping: per-expert names merged, renamed keys), for any experts-interface
            family; 4.x: the six families' per-expert or fused expert names.
        dtype: the model's dtype (``torch.bfloat16`` or ``"bfloat16"``); default (None or ``"auto"``): the
            checkpoint's (``config.dtype``).
        the rest: as for :func:`moe_swap.offload`.

    Returns the model (``eval()`` mode); its report, with the load time and the peak host memory of the
    load, is ``model.moe_swap_report``. A checkpoint missing expert tensors raises naming them; an
    unsupported architecture raises listing the supported ones.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_policy_and_mode(policy, mode, eviction, ids_path, copy_cost)
    _check_schedule(slots, prefetch_depth)
    dtype = check_dtype(dtype)
    dev = _check_device(device)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"path={path!r} has no config.json (expected a Hugging Face checkpoint folder)")
    from accelerate import init_empty_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the modeling code now, outside the measured load

    started = time.perf_counter()
    peak_reset = _reset_peak_host_memory()
    host_before = _current_host_memory()
    index = CheckpointIndex(path)
    dtype = dtype or _checkpoint_dtype(config, index)

    # parameters on meta (no memory); buffers such as rotary tables are computed for real
    with init_empty_weights(include_buffers=False), _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    family, layers = models.model_experts(model)
    if family is None:
        return _load_interface_experts(model, layers, index, dtype, dev, path, started, peak_reset, host_before,
                                       dict(gpu_budget=gpu_budget, policy=policy, mode=mode, slots=slots,
                                            prefetch_depth=prefetch_depth, eviction=eviction, predict=predict,
                                            ids_path=ids_path, copy_cost=copy_cost))

    expert_keys = {k for layer in layers for k in _expert_keys(layer, family, index)}
    missing = sorted(k for k in expert_keys if k not in index)
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ValueError(f"checkpoint {path!r} is missing expert tensors: {shown}")

    expert_params = {id(p) for layer in layers for p in models.expert_parameters(layer, family)}
    targets = {name: t for name, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False)) if id(t) not in expert_params}
    names = set(targets)
    loaded = set()
    with torch.no_grad():
        for key in index.entries:
            if key in expert_keys:
                continue
            name = _model_name(key, family, names)
            if name is None:
                continue  # e.g. a checkpoint's extra heads; transformers ignores them too
            target = targets[name]
            value_dtype = dtype if index.entries[key].dtype.is_floating_point and target.dtype.is_floating_point \
                else target.dtype
            if tuple(target.shape) != index.entries[key].shape:
                raise ValueError(f"checkpoint tensor {key!r} has shape {list(index.entries[key].shape)}, the model "
                                 f"expects {list(target.shape)}")
            _set_tensor(model, name, index.read(key, value_dtype).to(dev))
            loaded.add(name)
        _tie_and_check(model, config, expert_params, path)

        element_size = torch.empty((), dtype=dtype).element_size()
        report = _offload(
            model, family, layers, lambda layer: _read_layer_experts(layer, family, index, dtype),
            element_size, dev, gpu_budget, policy, mode, slots, prefetch_depth, move_rest=True,
            add_streamed=lambda layer, streamer: _stream_layer_experts(layer, family, index, dtype, streamer),
            eviction=eviction, predict=predict, ids_path=ids_path, copy_cost=copy_cost)
    _record_load(report, started, peak_reset, host_before)
    return model


def _record_load(report, started: float, peak_reset: bool, host_before: int) -> None:
    report.load = {
        "seconds": time.perf_counter() - started,
        "peak_host_bytes": peak_host_memory(),
        "host_bytes_before": host_before,
        "peak_is_load_only": peak_reset,  # False: the peak is the process's lifetime peak
    }


def _tie_and_check(model: nn.Module, config, expert_params: set, path: str) -> None:
    """Tie the output embeddings where the config says so; every non-expert tensor must have been read."""
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None \
            and model.get_output_embeddings().weight.is_meta:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    still_meta = [n for n, t in list(model.named_parameters(remove_duplicate=False))
                  + list(model.named_buffers(remove_duplicate=False))
                  if t.is_meta and id(t) not in expert_params]
    if still_meta:
        shown = ", ".join(still_meta[:12]) + (f", ... ({len(still_meta)} in all)" if len(still_meta) > 12 else "")
        raise ValueError(f"checkpoint {path!r} is missing tensors: {shown}")


def _load_interface_experts(model: nn.Module, layers: list[MoELayer], index: CheckpointIndex, dtype: torch.dtype,
                            dev: torch.device, path: str, started: float, peak_reset: bool, host_before: int,
                            options: dict):
    """load() for transformers 5.x experts modules: names by transformers' rules (:class:`_TransformersNames`)."""
    names = _TransformersNames(model, index)

    def read(key: str) -> torch.Tensor:
        return index.read(key, dtype if index.entries[key].dtype.is_floating_point else None)

    expert_targets = {f"{layer.experts_name}.{name}" for layer in layers
                      for name in (layer.layout.w13_name, "down_proj")}
    missing = sorted(t for t in expert_targets if t not in names.groups) or \
        [k for layer in layers for k in names.missing_expert_keys(layer)]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ValueError(f"checkpoint {path!r} is missing expert tensors: {shown} (by transformers' loading rules "
                         f"for {type(model).__name__})")
    expert_params = {id(p) for layer in layers for p in models.expert_parameters(layer)}
    targets = {name: t for name, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False)) if id(t) not in expert_params}
    with torch.no_grad():
        for group in names.groups:
            if group in expert_targets:
                continue
            for name, value in names.convert(group, read).items():
                target = targets.get(name)
                if target is None:
                    continue
                if tuple(target.shape) != tuple(value.shape):
                    raise ValueError(f"checkpoint tensors {names.source_keys(group)} give {name} the shape "
                                     f"{list(value.shape)}, the model expects {list(target.shape)}")
                if not (value.is_floating_point() and target.dtype.is_floating_point):
                    value = value.to(target.dtype)
                _set_tensor(model, name, value.to(dev))
        _tie_and_check(model, model.config, expert_params, path)

        def fill(layer: MoELayer, write) -> None:
            for which in ("w13", "w2"):
                for expert, piece in names.expert_pieces(layer, which, read):
                    write(which, expert, piece)

        def resident(layer: MoELayer):
            w13 = torch.empty(layer.w13_shape(), dtype=dtype)
            w2 = torch.empty(layer.w2_shape(), dtype=dtype)
            out = {"w13": w13, "w2": w2}

            def write(which, expert, piece):
                if tuple(piece.shape[1:]) != tuple(out[which].shape[1:]) or expert + piece.shape[0] > layer.num_experts:
                    raise ValueError(f"{layer.experts_name}: checkpoint gives {which} experts of shape "
                                     f"{list(piece.shape[1:])}, the model expects {list(out[which].shape[1:])}")
                out[which][expert:expert + piece.shape[0]].copy_(piece)

            fill(layer, write)
            return w13, w2

        def streamed(layer: MoELayer, streamer) -> int:
            target = streamer.reserve_layer(layer.w13_shape(), layer.w2_shape(), dtype)
            fill(layer, lambda which, expert, piece: streamer.write(target, which, piece, expert=expert))
            return target

        element_size = torch.empty((), dtype=dtype).element_size()
        report = _offload(model, None, layers, resident, element_size, dev, options["gpu_budget"], options["policy"],
                          options["mode"], options["slots"], options["prefetch_depth"], move_rest=True,
                          add_streamed=streamed, eviction=options["eviction"], predict=options["predict"],
                          ids_path=options["ids_path"], copy_cost=options["copy_cost"])
    _record_load(report, started, peak_reset, host_before)
    return model

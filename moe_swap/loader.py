"""``moe_swap.load(path)``: build a MoE model from a safetensors folder without materialising it.

The model is built on the meta device; non-expert tensors are read straight to the device; each
streamed expert tensor is read (plain file reads: no whole-file mapping resident in the process) and
written into its place in the HostStore before the next is read, so resident memory stays near the
HostStore plus one tensor. Layers the planner keeps resident are assembled and moved to the device.
Peak host memory during the load is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from . import models
from .offload import _check_device, _check_policy_and_mode, _check_schedule, _offload, check_dtype
from .models import Family, MoELayer
from .streamer import read_safetensors_header

__all__ = ["load", "CheckpointIndex", "peak_host_memory"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
            ``model.safetensors.index.json``), in Hugging Face's per-expert or fused expert naming.
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
    family = models.family_for_config(config)
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
    layers = models.find_moe_layers(model, family)

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
        if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None \
                and model.get_output_embeddings().weight.is_meta:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        still_meta = [n for n, t in list(model.named_parameters(remove_duplicate=False))
                      + list(model.named_buffers(remove_duplicate=False))
                      if t.is_meta and id(t) not in expert_params]
        if still_meta:
            shown = ", ".join(still_meta[:12]) + (f", ... ({len(still_meta)} in all)" if len(still_meta) > 12 else "")
            raise ValueError(f"checkpoint {path!r} is missing tensors: {shown}")

        element_size = torch.empty((), dtype=dtype).element_size()
        report = _offload(
            model, family, layers, lambda layer: _read_layer_experts(layer, family, index, dtype),
            element_size, dev, gpu_budget, policy, mode, slots, prefetch_depth, move_rest=True,
            add_streamed=lambda layer, streamer: _stream_layer_experts(layer, family, index, dtype, streamer),
            eviction=eviction, predict=predict, ids_path=ids_path, copy_cost=copy_cost)
    report.load = {
        "seconds": time.perf_counter() - started,
        "peak_host_bytes": peak_host_memory(),
        "host_bytes_before": host_before,
        "peak_is_load_only": peak_reset,  # False: the peak is the process's lifetime peak
    }
    return model

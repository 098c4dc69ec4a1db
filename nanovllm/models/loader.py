"""Load safetensors weights (one file or shards with an index) into a model, shard by shard for TP."""
import json
import os
from glob import glob

import torch
from safetensors import safe_open
from torch import nn


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists {', '.join(missing)}, which is missing; re-download the model")
        return files
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}; point model at a folder holding a checkpoint")
    return files


def load_model(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into its parameter, cast to the parameter's dtype (the checkpoint's dtype
    may differ); raises naming any missing or unreadable file and any missing or unexpected tensor."""
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in weight_files(path):
        try:
            handle = safe_open(file, "pt", "cpu")
        except Exception as e:
            raise RuntimeError(f"cannot read weights {file}: {e} (the file is truncated or corrupt; re-download it)") from e
        with handle as f:
            for name in f.keys():
                target, shard_id = name, None
                for key, (merged, sid) in packed.items():
                    if f".{key}." in name:
                        target, shard_id = name.replace(f".{key}.", f".{merged}."), sid
                        break
                param = params.get(target)
                if param is None:
                    if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and model.tie_word_embeddings):
                        continue
                    raise ValueError(f"{file}: tensor {name} has no place in {type(model).__name__}")
                tensor = f.get_tensor(name)
                check_fits(file, name, tensor, target, param, shard_id)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor)
                elif shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
                loaded.add(f"{target}:{shard_id}")
    expected = set()
    for name, param in params.items():
        module = name.rsplit(".", 1)[0]
        shards = [sid for key, (merged, sid) in packed.items() if module.endswith(merged)]
        expected.update(f"{name}:{sid}" for sid in (shards or [None]))
    missing = sorted(expected - loaded)
    if model.tie_word_embeddings:
        missing = [m for m in missing if not m.startswith("lm_head.")]
    if missing:
        names = [checkpoint_name(m, packed) for m in missing]
        raise ValueError(f"the checkpoint in {path} lacks tensors: {', '.join(names[:8])}"
                         f"{' ...' if len(names) > 8 else ''}; re-download or re-convert the model")


def check_fits(file: str, name: str, tensor: torch.Tensor, target: str, param: nn.Parameter, shard_id) -> None:
    """ValueError unless `tensor` has exactly the (unsharded) shape `param` expects and a floating-point dtype:
    a tensor of another shape would otherwise be truncated or broadcast into the parameter."""
    expected = param.checkpoint_shape(param, shard_id) if hasattr(param, "checkpoint_shape") else tuple(param.shape)
    into = target + (f" (part {shard_id!r})" if shard_id is not None else "")
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{file}: tensor {name} has shape {list(tensor.shape)}, but parameter {into} expects "
                         f"{list(expected)} (sizes from config.json): the checkpoint and its config.json disagree; "
                         f"re-download the model, or fix config.json")
    if tensor.dtype.is_floating_point != param.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{file}: tensor {name} is {tensor.dtype}, but parameter {into} holds {param.dtype} "
                         f"weights: the checkpoint is not a floating-point model (quantized or damaged)")


def checkpoint_name(key: str, packed: dict) -> str:
    """The checkpoint's name for a loaded-key `param:shard`, e.g. `...qkv_proj.weight:k` -> `...k_proj.weight`."""
    name, shard = key.split(":")
    for ckpt, (merged, sid) in packed.items():
        if f".{merged}." in name and str(sid) == shard:
            return name.replace(f".{merged}.", f".{ckpt}.")
    return name

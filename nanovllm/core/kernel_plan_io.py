"""A KernelPlan as a TOML file: written in a stable order so two plans diff line by line, read back to replay.

Replaying pins every op to the kernel the file names; the registry then refuses, naming the op, any kernel
that is missing or cannot serve this run, before any weight is loaded.
"""
import json
from pathlib import Path

from nanovllm.core.registry import OPS, KernelPlan
from nanovllm.core.toml import tomllib


HEADER = "# nanovllm kernel plan: replay with `--kernel-plan FILE` or LLM(kernel_plan=FILE)\n"


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def plan_to_toml(plan: KernelPlan) -> str:
    lines = [HEADER.rstrip("\n"), f"backend = {toml_string(plan.backend)}", ""]
    if plan.query is not None:
        q = plan.query
        lines += ["[query]", f"device_type = {toml_string(q.device_type)}",
                  f"dtype = {toml_string(str(q.dtype).removeprefix('torch.'))}", f"head_dim = {q.head_dim}",
                  f"num_heads = {q.num_heads}", f"num_kv_heads = {q.num_kv_heads}", f"block_size = {q.block_size}",
                  f"kv_cache_dtype = {toml_string(str(q.kv_dtype).removeprefix('torch.'))}", ""]
    for op in sorted(plan.choices, key=lambda op: (list(OPS).index(op) if op in OPS else len(OPS), op)):
        c = plan.choices[op]
        rejected = ", ".join(toml_string(f"{name}: {'; '.join(reasons)}") for name, reasons in c.rejected)
        lines += [f"[ops.{toml_string(op)}]", f"kernel = {toml_string(c.impl.full_name)}",
                  f"plugin = {toml_string(c.impl.plugin)}", f"version = {toml_string(c.impl.plugin_version)}",
                  f"why = {toml_string(c.why)}"]
        if c.impl.fallback:
            lines.append(f"fallback = {toml_string(c.impl.fallback)}")
        lines += [f"rejected = [{rejected}]", ""]
    return "\n".join(lines)


def save_plan(plan: KernelPlan, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_to_toml(plan))
    return path


def load_plan(path: str | Path) -> tuple[str, dict[str, str]]:
    """(backend, {op: "backend/kernel"}) of a saved plan; ValueError naming the file and what is wrong."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"kernel plan {str(path)!r} does not exist; write one with `nanovllm backends --plan "
                         f"--save-plan FILE` or LLM.save_kernel_plan(FILE)") from None
    except IsADirectoryError:
        raise ValueError(f"kernel plan {str(path)!r} is a folder; pass the plan's TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"kernel plan {str(path)!r} is not valid TOML: {e}") from None
    except OSError as e:
        raise ValueError(f"kernel plan {str(path)!r} cannot be read: {e.strerror or e}") from None
    backend, ops = data.get("backend"), data.get("ops", {})
    if not isinstance(backend, str) or not isinstance(ops, dict):
        raise ValueError(f"kernel plan {str(path)!r} needs `backend = \"name\"` and [ops.\"<op>\"] tables")
    kernels = {}
    for op in OPS:
        kernel = ops.get(op, {}).get("kernel") if isinstance(ops.get(op), dict) else None
        if not isinstance(kernel, str):
            raise ValueError(f"kernel plan {str(path)!r} has no kernel for op {op!r}: every op must be pinned")
        kernels[op] = kernel
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"kernel plan {str(path)!r} names unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return backend, kernels

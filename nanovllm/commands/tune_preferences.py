"""Write `nanovllm tune`'s winners into the user's plugins.toml as a `[kernels.<backend>]` block.

The block carries a comment "chosen by tune on <date>, <device>" and a `[tune.<backend>]` table recording
which ops tune chose, so a later run can say so in its plan and a later tune can replace its own choices.
A choice the user wrote is never replaced silently: without `force` the write is refused, naming the keys.
"""
import json
import re
from pathlib import Path

from nanovllm.core.toml import tomllib


HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")


def table_name(header: str) -> str:
    return ".".join(part.strip().strip('"').strip("'") for part in header.split("."))


def remove_tables(text: str, names: set[str]) -> str:
    """`text` without the tables whose header is one of `names` (header to the next header), nor tune's
    comment line just above them."""
    out, skipping = [], False
    for line in text.splitlines():
        match = HEADER.match(line)
        if match:
            skipping = table_name(match.group(1)) in names
            if skipping and out and out[-1].startswith("# chosen by tune on"):
                out.pop()
        if not skipping:
            out.append(line)
    return "\n".join(out)


def render(value) -> str:
    return json.dumps(value)  # strings and lists of strings: JSON and TOML agree


def write_tuned_preferences(path: Path, backend: str, winners: dict[str, list[str]], date: str, device: str,
                            force: bool = False) -> str:
    """Lay `winners` ({op: kernel names, fastest first}) over `path`'s `[kernels.<backend>]`; returns the block."""
    text = path.read_text() if path.is_file() else ""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e}); fix it before tuning into it") from None
    written = data.get("kernels", {}).get(backend, {})
    tuned_before = set(data.get("tune", {}).get(backend, {}).get("ops", []))
    theirs = sorted(op for op in winners if op in written and op not in tuned_before)
    if theirs and not force:
        raise ValueError(f"{path} already sets {', '.join(repr(op) for op in theirs)} in [kernels.{backend}], "
                         f"written by you, not by tune: tune will not replace them silently. Rerun with --force "
                         f"to replace them, or delete those keys")
    kept = {op: v for op, v in written.items() if op not in winners}
    lines = [f"# chosen by tune on {date}, {device}", f"[kernels.{backend}]"]
    lines += [f"{render(op)} = {render(v)}  # kept from this file" for op, v in kept.items()]
    lines += [f"{render(op)} = {render(names)}" for op, names in winners.items()]
    tuned_ops = sorted((tuned_before & set(written)) | set(winners))
    lines += ["", f"[tune.{backend}]", f"date = {render(date)}", f"device = {render(device)}",
              f"ops = {render(tuned_ops)}"]
    block = "\n".join(lines) + "\n"
    rest = remove_tables(text, {f"kernels.{backend}", f"tune.{backend}"}).rstrip()
    new_text = (rest + "\n\n" if rest else "") + block
    try:
        tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: cannot add the tuned [kernels.{backend}] block ({e}); does the file define "
                         f"kernels.{backend} some other way (dotted keys, inline table)? Make it a [kernels.{backend}] "
                         f"table and rerun") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_text)
    return block

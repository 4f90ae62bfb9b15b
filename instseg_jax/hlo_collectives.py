"""What crosses chips in a compiled program: the collectives of its HLO text.

DESIGN "Only gradients cross chips": a training step may all-reduce gradients and a few global
scalars, and nothing else. `collectives(compiled.as_text())` lists every collective with its
kind, the bytes it produces per execution and the `op_name` of the JAX operation that caused
it, so a test (tests/test_sharding_collectives.py) or the compile tool can say what leaks and
from where. The count is static: a collective inside a loop body is listed once.
"""

from __future__ import annotations

import re
from collections import Counter

# Every cross-device communication an XLA program can hold. An activation resharded by the SPMD
# partitioner shows up as an all-gather, all-to-all or collective-permute.
KINDS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "ragged-all-to-all",
    "collective-broadcast",
)
# The kinds a training step must not hold (only all-reduces of gradients and scalars may).
ACTIVATION_KINDS = ("all-gather", "all-to-all", "collective-permute", "ragged-all-to-all")

# Bytes per element of HLO's element types (sub-byte types count as a whole byte: the
# figures here only need to be upper bounds).
ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

# `%name = TYPE opcode(operands), attributes` (the `%` and `ROOT ` are optional).
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    r"(?P<opcode>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
OPERAND = re.compile(r"%([\w.\-]+)")
ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+\w*)?)\[([0-9,]*)\]")
OP_NAME = re.compile(r'op_name="([^"]*)"')
STACK_FRAME = re.compile(r"stack_frame_id=(\d+)")
# The tables at the head of a compiled module's text that locate each instruction's source:
# `FileNames` / `FunctionNames` (id "name"), `FileLocations` (id {file_name_id=.. line=..}) and
# `StackFrames` (id {file_location_id=.. parent_frame_id=..}).
TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')
FIELD = re.compile(r"(\w+)=(\d+)")


def shape_bytes(hlo_type: str) -> int:
    """Bytes of an HLO result type: one array (`f32[8,4]{1,0}`) or a tuple of them."""
    total = 0
    for element, dims in ARRAY.findall(hlo_type):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        # fp8 types (f8e4m3fn, ...) are a byte; an unknown type counts 4 to stay an upper bound.
        size = 1 if element.startswith("f8") else ELEMENT_BYTES.get(element, 4)
        total += count * size
    return total


def _kind(opcode: str) -> tuple[str, str] | None:
    """(kind, "sync" | "start" | "done") of a collective opcode, else None."""
    for suffix in ("start", "done"):
        base = opcode.removesuffix(f"-{suffix}")
        if base != opcode and base in KINDS:
            return base, suffix
    return (opcode, "sync") if opcode in KINDS else None


def source_locations(hlo_text: str) -> dict[int, str]:
    """{stack frame id: "file:line (function)"} of the frame an instruction's metadata names
    (its innermost Python frame outside JAX), from the tables of the module's text; empty
    when the text has none."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        row = TABLE_ROW.match(line) if current is not None else None
        if row is None:
            current = None
            continue
        key, name, fields = row.groups()
        current[int(key)] = (
            name if name is not None else dict((k, int(v)) for k, v in FIELD.findall(fields))
        )
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations = tables.get("FileLocations", {})
    out = {}
    for frame, fields in tables.get("StackFrames", {}).items():
        where = locations.get(fields.get("file_location_id"), {})
        if where:
            out[frame] = (
                f"{files.get(where.get('file_name_id'), '?')}:{where.get('line', 0)} "
                f"({functions.get(where.get('function_name_id'), '?')})"
            )
    return out


def collectives(hlo_text: str, details: bool = False) -> list[dict]:
    """Every collective of a compiled program's HLO text, in program order:
    {"kind", "bytes", "op_name"} with kind one of KINDS, bytes the size of what it produces
    (the gathered array of an all-gather, the reduced one of an all-reduce) and op_name the JAX
    operation that caused it. With `details`, also "shapes", its arrays ("f32[3,3,32,64]";
    several for a combined all-reduce), and "source", the Python line that called it
    ("file:line (function)"). op_name and source are "" when the compiler left no metadata.
    An asynchronous pair (`all-gather-start` / `-done`) counts once, at its done, with its
    start's metadata when the done has none."""
    frames = source_locations(hlo_text) if details else {}
    found, started = [], {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match is None:
            continue
        kind = _kind(match["opcode"])
        if kind is None:
            continue
        base, phase = kind
        op_name = OP_NAME.search(match["rest"])
        frame = STACK_FRAME.search(match["rest"])
        metadata = (
            op_name.group(1) if op_name else "",
            frames.get(int(frame.group(1)), "") if frame else "",
        )
        if phase == "start":  # its done gives the size of the result
            started[match["name"]] = metadata
            continue
        if phase == "done" and not any(metadata):
            operand = OPERAND.search(match["rest"])
            metadata = started.get(operand.group(1) if operand else "", metadata)
        found.append({"kind": base, "bytes": shape_bytes(match["type"]), "op_name": metadata[0]})
        if details:
            found[-1]["shapes"] = [f"{e}[{d}]" for e, d in ARRAY.findall(match["type"])]
            found[-1]["source"] = metadata[1]
    return found


def summary(found: list[dict]) -> dict:
    """{kind: {"count", "bytes"}} of a `collectives` list, every kind of KINDS present."""
    counts, sizes = Counter(), Counter()
    for c in found:
        counts[c["kind"]] += 1
        sizes[c["kind"]] += c["bytes"]
    return {k: {"count": counts[k], "bytes": sizes[k]} for k in KINDS}


def bytes_by_element_type(found: list[dict], kind: str = "all-reduce") -> dict:
    """{element type: bytes} of the collectives of one kind (`found`: collectives(...,
    details=True)), e.g. whether a bfloat16 step all-reduces its gradients in "bf16" or "f32"."""
    sizes = Counter()
    for c in found:
        if c["kind"] == kind:
            for shape in c["shapes"]:
                sizes[shape.split("[", 1)[0]] += shape_bytes(shape)
    return dict(sorted(sizes.items()))


def activation_collectives(found: list[dict]) -> list[dict]:
    """The collectives of ACTIVATION_KINDS (what a training step must not hold)."""
    return [c for c in found if c["kind"] in ACTIVATION_KINDS]


def all_reduce_budget(found: list[dict], parameter_sizes) -> dict:
    """What a training step's all-reduces carry (`found`: collectives(..., details=True))
    against its parameters (`parameter_sizes`: the element count of each).

    An all-reduced array of a parameter's size is that parameter's gradient the first time
    ("gradient_bytes") and a duplicate after that ("duplicate_bytes": XLA's CPU pipeline
    all-reduces the gradient of a weight shared by several pyramid levels once per level;
    the TPU pipeline reassociates the sum of a shared convolution's gradients into one).
    Any other array counts in "other_bytes" and is listed in "other" with its op_name and
    source: global normalisers and metrics, a few scalars, in a step that keeps activations
    on their chips."""
    unused = Counter(int(n) for n in parameter_sizes)
    known = set(unused)
    budget = {"gradient_bytes": 0, "duplicate_bytes": 0, "other_bytes": 0, "other": []}
    for c in found:
        if c["kind"] != "all-reduce":
            continue
        for shape in c["shapes"]:
            size = shape_bytes(shape)
            elements = 1
            for d in filter(None, shape.split("[", 1)[1].rstrip("]").split(",")):
                elements *= int(d)
            if unused[elements] > 0:
                unused[elements] -= 1
                budget["gradient_bytes"] += size
            elif elements in known and elements > 1:
                budget["duplicate_bytes"] += size
            else:
                budget["other_bytes"] += size
                budget["other"].append(
                    {"shape": shape, "op_name": c["op_name"], "source": c["source"]}
                )
    return budget


def step_report(hlo_text: str, parameter_sizes, parameter_bytes: int) -> dict:
    """What crosses chips in a compiled training step, against its parameters (their element
    counts and total bytes): {"param_bytes", "summary", "activation", "all_reduce"}."""
    found = collectives(hlo_text, details=True)
    return {
        "param_bytes": parameter_bytes,
        "summary": summary(found),
        "activation": activation_collectives(found),
        "all_reduce": all_reduce_budget(found, parameter_sizes),
    }

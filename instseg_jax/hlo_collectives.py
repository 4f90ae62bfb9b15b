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


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of a compiled program's HLO text, in program order:
    {"kind", "bytes", "op_name"} with kind one of KINDS, bytes the size of what it produces
    (the gathered array of an all-gather, the reduced one of an all-reduce) and op_name the
    JAX operation that caused it ("" when the compiler left no metadata). An asynchronous
    pair (`all-gather-start` / `-done`) counts once, at its done, with its start's op_name
    when the done has none."""
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
        op_name = op_name.group(1) if op_name else ""
        if phase == "start":  # its done gives the size of the result
            started[match["name"]] = op_name
            continue
        if phase == "done":
            operand = OPERAND.search(match["rest"])
            op_name = op_name or started.get(operand.group(1) if operand else "", "")
        found.append({"kind": base, "bytes": shape_bytes(match["type"]), "op_name": op_name})
    return found


def summary(found: list[dict]) -> dict:
    """{kind: {"count", "bytes"}} of a `collectives` list, every kind of KINDS present."""
    counts, sizes = Counter(), Counter()
    for c in found:
        counts[c["kind"]] += 1
        sizes[c["kind"]] += c["bytes"]
    return {k: {"count": counts[k], "bytes": sizes[k]} for k in KINDS}


def activation_collectives(found: list[dict]) -> list[dict]:
    """The collectives of ACTIVATION_KINDS (what a training step must not hold)."""
    return [c for c in found if c["kind"] in ACTIVATION_KINDS]

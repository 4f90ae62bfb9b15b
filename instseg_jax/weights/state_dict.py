"""The ground of every weight importer: reading a state_dict from a file, torchvision's key
names across releases, the missing/unexpected-key check, and torch -> Flax tensor layouts.

No model is converted here: the converters above (resnet.py, torchvision*.py, huggingface.py)
say which keys they expect and where each tensor goes, and importer.py on top picks one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


class StateDictError(ValueError):
    """A state_dict that is not the model a converter expects (names the key and the file)."""


# ----------------------------------------------------------------------------- reading


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """NumPy arrays by key from a .pth (torch.load, weights_only=True), .npz or .safetensors
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs torch (pip install 'instseg_jax[torch]'), or save the "
            "state_dict as .npz with numpy.savez(file, **{k: v.numpy() for k, v in sd.items()})"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision's reference training scripts save {"model": ...}
    if not isinstance(state, dict):
        raise StateDictError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (an 8-byte little-endian header length, a JSON header
    of dtype, shape and byte offsets, then the raw data), without the safetensors package.
    bfloat16 tensors are widened to float32."""
    raw = Path(path).read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    data = memoryview(raw)[8 + header_length :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = entry["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(data[start:end], np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[dtype])
        else:
            raise StateDictError(f"{path}: tensor {name} has dtype {dtype}, not read here")
        out[name] = array.reshape(entry["shape"]).copy()
    return out


# ----------------------------------------------------------------------------- key names

# Key names of torchvision releases before ~0.13 (and of its published .pth files) -> today's.
_LEGACY_KEYS = (
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$"),
     r"backbone.fpn.\1_blocks.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
)  # fmt: skip


def normalize_keys(state_dict: dict) -> dict[str, np.ndarray]:
    """Today's torchvision key names; drops BN step counters and a DataParallel prefix."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in _LEGACY_KEYS:
            match = pattern.match(key)
            if match and replacement is None:  # mask_fcn1.. -> mask_head.0.0..
                key = f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.{match.group(2)}"
            elif match:
                key = pattern.sub(replacement, key)
        out[key] = np.asarray(value)
    return out


def count_indices(keys, pattern: str) -> int:
    """How many distinct values the first group of `pattern` takes over `keys` (the blocks of a
    stage, the convs of a head)."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def shape_of(state_dict: dict, key: str) -> tuple[int, ...]:
    """The shape of state_dict[key]; StateDictError("missing key ...") when there is none (an
    architecture read from shapes reports the first key it lacks)."""
    if key not in state_dict:
        raise StateDictError(f"missing key {key!r}")
    return state_dict[key].shape


def check_keys(state_dict: dict, expected: list[str], what: str) -> None:
    """Raise StateDictError("{what}: missing key ...") naming the first expected key that is
    absent (in module order) or, when none is, the first key that is not expected."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise StateDictError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise StateDictError(
            f"{what}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )


def read_checked(state_dict: dict, source: str, model_name: str, architecture, expected_keys):
    """(normalised state_dict, architecture) of a torchvision checkpoint, its keys exactly
    those `expected_keys(architecture)` lists; StateDictError names `source`, `model_name`
    and the first missing (else unexpected) key."""
    sd = normalize_keys(state_dict)
    what = f"{source}: not a {model_name} state_dict"
    try:
        arch = architecture(sd)
    except StateDictError as error:
        raise StateDictError(f"{what}: {error}") from None
    check_keys(sd, expected_keys(arch), what)
    return sd, arch


# ----------------------------------------------------------------------------- tensor layouts


def f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def conv_kernel(w) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O]."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), dtype=np.float32)


def conv_transpose_kernel(w) -> np.ndarray:
    """torch ConvTranspose2d weight [I, O, kh, kw] -> Flax ConvTranspose kernel [kh, kw, I, O]
    with the same taps (no spatial flip)."""
    return f32(np.transpose(w, (2, 3, 0, 1)))


def dense_kernel(w) -> np.ndarray:
    """torch Linear weight [O, I] -> Flax Dense kernel [I, O]."""
    return f32(w).T.copy()


def dense_1x1_kernel(w) -> np.ndarray:
    """torch 1x1 Conv2d weight [O, I, 1, 1] -> Flax Dense kernel [I, O]."""
    return np.ascontiguousarray(w[:, :, 0, 0].T, dtype=np.float32)


def conv_params(state_dict: dict, prefix: str) -> dict:
    """{"kernel", "bias"} of the Conv2d at `prefix`."""
    return {
        "kernel": conv_kernel(state_dict[f"{prefix}.weight"]),
        "bias": f32(state_dict[f"{prefix}.bias"]),
    }


def dense_params(state_dict: dict, prefix: str) -> dict:
    """{"kernel", "bias"} of the Linear at `prefix`."""
    return {
        "kernel": dense_kernel(state_dict[f"{prefix}.weight"]),
        "bias": f32(state_dict[f"{prefix}.bias"]),
    }

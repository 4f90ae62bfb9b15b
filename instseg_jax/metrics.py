"""Training metrics: a JSON-lines file and TensorBoard event files, no TensorFlow needed.

TensorBoard reads TFRecord files of `Event` protos; the few fields used here (wall time, step,
scalar summaries) are encoded by hand below, with the record framing's masked CRC-32C.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float, step: int, scalars: dict | None = None, file_version: str | None = None
) -> bytes:
    """Serialized tensorboard Event: wall_time (1), step (2), file_version (3), summary (5)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, tag.encode())
                + _varint(2 << 3 | 5)
                + struct.pack("<f", float(value)),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))
    )


class MetricsWriter:
    """Appends {step, metrics...} to workdir/metrics.jsonl and to a TensorBoard event file.

    Only process 0 writes (``enabled``); other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.workdir / "metrics.jsonl").open("a")
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.events = self.workdir / "tensorboard" / name
        self.events.parent.mkdir(exist_ok=True)
        self.event_file = self.events.open("ab")
        self.event_file.write(
            frame_record(encode_event(time.time(), 0, file_version="brain.Event:2"))
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self.jsonl.flush()
        self.event_file.write(frame_record(encode_event(time.time(), int(step), values)))
        self.event_file.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.event_file.close()

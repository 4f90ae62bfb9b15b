"""Event files parse with protobuf's own runtime and carry valid TFRecord CRCs."""

import json
import struct

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from instseg_jax.metrics import MetricsWriter


def event_class():
    """tensorboard's Event / Summary / Value messages, declared here from their .proto fields."""
    file = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="t")
    value = file.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=9, label=1)
    value.field.add(name="simple_value", number=2, type=2, label=1)
    summary = file.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=11, label=3, type_name=".t.Value")
    event = file.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)
    event.field.add(name="step", number=2, type=3, label=1)
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, label=1, type_name=".t.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit (Castagnoli, reflected 0x82F63B78): slow and obviously right."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    crc = crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_value():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the standard check value


def test_jsonl_and_event_file_round_trip(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "lr": 0.01})
    writer.write(2, {"loss": 1.25, "lr": 0.02})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 0.01}, {"step": 2, "loss": 1.25, "lr": 0.02}]

    (events_file,) = (tmp_path / "tensorboard").iterdir()
    data = events_file.read_bytes()
    Event = event_class()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert header_crc == masked(header)
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert payload_crc == masked(payload)
        events.append(Event.FromString(payload))
        offset += 16 + length
    assert events_file.name.startswith("events.out.tfevents.")
    assert events[0].file_version == "brain.Event:2"
    scalars = {}
    for event in events[1:]:
        for value in event.summary.value:
            scalars[event.step, value.tag] = value.simple_value
    assert scalars == {
        (1, "loss"): 2.5,
        (1, "lr"): pytest.approx(0.01),
        (2, "loss"): 1.25,
        (2, "lr"): pytest.approx(0.02),
    }

"""One seed -> named random streams; a step's key is fold_in(stream, step).

Streams are derived by hashing their name into the seed's key, so adding a stream never
changes the others, and a resumed run at step s draws exactly the keys it would have drawn.
"""

from __future__ import annotations

import zlib

import jax

STREAMS = ("params", "sampling", "dropout", "data")


def stream(seed: int, name: str) -> jax.Array:
    if name not in STREAMS:
        raise KeyError(f"unknown random stream {name!r}; known: {STREAMS}")
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def step_key(stream_key: jax.Array, step) -> jax.Array:
    return jax.random.fold_in(stream_key, step)

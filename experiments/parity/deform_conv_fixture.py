"""Writes tests/fixtures/torchvision_deform_conv_tiny.npz: torchvision.ops.deform_conv2d (the
modulated form, DCNv2) on seeded random inputs, which tests/ops/test_deform_conv.py compares
instseg_jax.ops.deform_conv.deform_conv2d against. Runs in the peer environment (torch):

    .venv-peer/bin/python -P experiments/parity/deform_conv_fixture.py

(-P: this folder's torchvision.py must not shadow the package.)

Offsets of std 1.5 px on a 7 x 6 map send many taps across cell borders and off the map; the
stride 2, padding 1 and dilation 1 are those of a ResNet's strided 3x3 (dbolya/yolact
backbone.py's DCN in the first block of a stage).
"""

from pathlib import Path

import numpy as np
import torch
import torchvision

OUT = (
    Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "torchvision_deform_conv_tiny.npz"
)


def main():
    rng = np.random.default_rng(2020)
    stride, padding, dilation = (2, 2), (1, 1), (1, 1)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    ho, wo = 4, 3
    offset = rng.normal(0, 1.5, (2, 18, ho, wo)).astype(np.float32)
    mask = rng.uniform(0, 1, (2, 9, ho, wo)).astype(np.float32)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    out = torchvision.ops.deform_conv2d(
        torch.from_numpy(x),
        torch.from_numpy(offset),
        torch.from_numpy(weight),
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=torch.from_numpy(mask),
    ).numpy()
    np.savez(
        OUT,
        x=x,
        offset=offset,
        mask=mask,
        weight=weight,
        out=out,
        stride=np.array(stride),
        padding=np.array(padding),
        dilation=np.array(dilation),
        torchvision=np.array(torchvision.__version__),
    )
    print(f"wrote {OUT} (torchvision {torchvision.__version__}, out {out.shape})")


if __name__ == "__main__":
    main()

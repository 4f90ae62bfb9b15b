"""The CI fixture of backbone initialisation from torchvision ResNet weights (`make peer` env).

    .venv-peer/bin/python experiments/parity/resnet_backbone.py tests/fixtures/resnet_tiny.npz

Two tiny ResNets in torchvision's classification layout (conv1, bn1, layer1..4, fc) built from
torchvision's own BasicBlock (resnet18/34's) and Bottleneck (resnet50/101's) at width 4, one
block per stage, with seeded random weights and batch-norm statistics, in eval mode; their
state_dicts and their layer1..layer4 outputs on a seeded input go into one .npz:
"<kind>/sd/<key>", "<kind>/out/layer<i>" (NCHW) and "input" (NCHW), kind "basic" or
"bottleneck". tests/weights/test_resnet_backbone.py converts the state_dicts with
instseg_jax.weights.resnet and compares our ResNet's res2..res5 with the stored outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This folder holds torchvision.py, which would shadow the torchvision package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402

WIDTH = 4


class TinyResNet(torch.nn.Module):
    """torchvision's ResNet module names and block classes, width 4, one block per stage."""

    def __init__(self, block):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, WIDTH, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(WIDTH)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        inplanes = WIDTH
        for stage in range(4):
            planes = WIDTH * 2**stage
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = torch.nn.Sequential(
                    torch.nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    torch.nn.BatchNorm2d(planes * block.expansion),
                )
            layer = torch.nn.Sequential(block(inplanes, planes, stride, downsample))
            setattr(self, f"layer{stage + 1}", layer)
            inplanes = planes * block.expansion
        self.fc = torch.nn.Linear(inplanes, 10)  # dropped by the conversion

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = {}
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outputs[f"layer{i}"] = x
        return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    image = torch.randn(1, 3, 64, 96)
    arrays = {"input": image.numpy()}
    for kind, block in (("basic", BasicBlock), ("bottleneck", Bottleneck)):
        model = TinyResNet(block)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
                    module.running_mean.uniform_(-0.3, 0.3)
                    module.running_var.uniform_(0.5, 2.0)
        model.eval()
        with torch.no_grad():
            outputs = model(image)
        for key, value in model.state_dict().items():
            arrays[f"{kind}/sd/{key}"] = value.numpy()
        for key, value in outputs.items():
            arrays[f"{kind}/out/{key}"] = value.numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

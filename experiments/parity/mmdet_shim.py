"""Lets mmdetection 3.x import on mmcv's lite build (MMCV_WITH_OPS=0, `make peer-mmdet`), which
has no compiled ops: mmdet imports names from mmcv.ops at import time in modules the heads'
losses never call (NMS, RoIAlign, deformable convolution, ...). Importing this module first
puts a stand-in `mmcv.ops` package in sys.modules whose every name (and every submodule's) is a
placeholder class that raises when called or instantiated, so a loss that reached a compiled op
would fail loudly instead of computing something else.

Import it before mmdet: `import mmdet_shim  # noqa: F401`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


def _placeholder(qualified_name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{qualified_name} is a compiled mmcv op, absent from the lite build "
            "(experiments/parity/mmdet_shim.py); this code path needs the full mmcv build"
        )

    return type(
        qualified_name.rsplit(".", 1)[-1],
        (),
        {
            "__new__": lambda cls, *a, **k: refuse(),
            "__call__": refuse,
            "apply": staticmethod(refuse),
        },
    )


class _StubOps(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubOps(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Puts the stand-in mmcv.ops in front of the real one (idempotent)."""
    if not any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
        del sys.modules[name]


install()

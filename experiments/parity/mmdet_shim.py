"""Lets mmdetection 3.x import on mmcv's lite build (MMCV_WITH_OPS=0, `make peer-mmdet`), which
has no compiled ops: mmdet imports names from mmcv.ops at import time in modules the heads'
losses never call (NMS, RoIAlign, deformable convolution, ...). Importing this module first
puts a stand-in `mmcv.ops` package in sys.modules whose every name (and every submodule's) is a
placeholder class that raises when called or instantiated, so a loss that reached a compiled op
would fail loudly instead of computing something else.

The exception: mmcv/ops/point_sample.py is plain PyTorch (grid_sample), and PointRend's loss
needs it, so `mmcv.ops.point_sample` and the names it defines are the real ones, loaded from
the installed file.

Import it before mmdet: `import mmdet_shim  # noqa: F401`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# mmcv.ops modules that compile nothing: loaded from their own files.
PURE_PYTHON_MODULES = ("point_sample",)


def _real_spec(fullname: str):
    """The spec of the installed file of a pure-Python mmcv.ops module."""
    folder = importlib.util.find_spec("mmcv").submodule_search_locations[0]
    path = f"{folder}/ops/{fullname.rsplit('.', 1)[-1]}.py"
    return importlib.util.spec_from_file_location(fullname, path)


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
        for module_name in PURE_PYTHON_MODULES:
            module = importlib.import_module(f"{self.__name__}.{module_name}")
            # As mmcv/ops/__init__.py does: the module's names (point_sample the function,
            # not the module) become the package's.
            for public in getattr(module, "__all__", None) or dir(module):
                if not public.startswith("_") and callable(getattr(module, public)):
                    setattr(self, public, getattr(module, public))
        if name in self.__dict__:
            return self.__dict__[name]
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in {f"mmcv.ops.{m}" for m in PURE_PYTHON_MODULES}:
            return _real_spec(fullname)
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

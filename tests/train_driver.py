"""Runs a training in this process and saves the final parameters (used by test_train.py).

python tests/train_driver.py CONFIG WORKDIR MAX_STEPS OUT.npz [--config.a.b=v ...]
"""

import sys

import jax
import numpy as np

from instseg_jax import config as config_lib
from instseg_jax import train as train_lib


def flat_params(state) -> dict:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
    }


def main(argv):
    spec, workdir, max_steps, out, *overrides = argv
    config = config_lib.load(spec, overrides)
    state = train_lib.train(config, workdir, max_steps=int(max_steps), progress=False)
    if jax.process_index() == 0:
        np.savez(out, **flat_params(state))


if __name__ == "__main__":
    main(sys.argv[1:])

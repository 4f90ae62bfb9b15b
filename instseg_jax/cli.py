"""The `instseg-jax` command. Subcommands arrive with the parts they drive."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instseg-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="showcase of the ops on a seeded synthetic scene")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out")
    commands.add_parser("version", help="print the package and JAX versions")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from instseg_jax import demo as demo_module

        demo_module.main(["--seed", str(args.seed), "--out", args.out])
    elif args.command == "version":
        import jax

        from instseg_jax import __version__

        print(f"instseg_jax {__version__}, jax {jax.__version__} ({jax.default_backend()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

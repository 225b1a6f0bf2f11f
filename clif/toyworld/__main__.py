"""`python -m clif.toyworld pretrain|experiment ...`: one command per step of the toy-world study."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from . import pretrain

    p = argparse.ArgumentParser(prog="python -m clif.toyworld", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pretrain.add_args(sub.add_parser("pretrain", help="Pretrain the world's CLIP, VAE and UNet."))
    args = p.parse_args(argv)
    if args.cmd == "pretrain":
        print(pretrain.run(args))


if __name__ == "__main__":
    main()

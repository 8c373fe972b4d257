"""python -m utils.toy build [--out toy_world]: write the toy world (datasets + pipeline folders)."""

from __future__ import annotations

import argparse

from .build import DEFAULT_OUT, build


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write datasets and pipeline folders from the committed weights")
    b.add_argument("--out", default=DEFAULT_OUT, help="folder to write the toy world into (default: %(default)s)")
    b.add_argument("--train_images", type=int, default=2000, help="images in the train split (default: %(default)s)")
    b.add_argument("--test_images", type=int, default=500, help="images in the test split (default: %(default)s)")
    b.add_argument("--shard_size", type=int, default=500, help="samples per webdataset shard (default: %(default)s)")
    b.add_argument("--resolution", type=int, default=32, help="image side in pixels (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of the drawn datasets (default: %(default)s)")
    b.add_argument("--force", action="store_true", help="rewrite parts that already exist")
    args = parser.parse_args()
    if args.command == "build":
        out = build(args.out, args.train_images, args.test_images, args.shard_size, args.seed, args.resolution,
                    args.force)
        print(f"toy world ready in {out}/")


if __name__ == "__main__":
    main()

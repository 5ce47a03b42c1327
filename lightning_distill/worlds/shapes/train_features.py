"""``python -m lightning_distill.train_features --out FILE``: train the shapes-world classifier behind the tiny
metrics (``features: shapes``) and save it as float16 safetensors (the shipped copy was made with the defaults)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_distill.worlds.shapes.features import DEFAULT_WEIGHTS, train_classifier


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Train the shapes-world classifier used by the tiny metrics.")
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net = train_classifier(args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

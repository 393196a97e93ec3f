"""``jeat generate``: class-conditional (or unconditional) samples from a model."""

from __future__ import annotations

import argparse

from jeat.cli.common import (
    _hold_outputs,
    _int_list,
    _load_source,
    _out_base,
    _source,
    model_command,
)


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from jeat.finish import generate_sample_chains, grid_width, write_grid_record
    from jeat.metrics import judge_dir, load_judge
    from jeat.utils import atomic_write, save_image_grid

    model, meta, cfg, data = _load_source(args, _source(args), args.dataset)
    if args.steps is not None:
        cfg.generate.steps = args.steps
    if args.radius is not None:
        cfg.generate.radius = args.radius
    if args.seeds is not None:
        cfg.generate.seeds = args.seeds
    if args.method is not None:
        cfg.generate.method = args.method
    if args.unconditional:
        cfg.generate.conditional = False
    if args.n is not None:
        cfg.generate.n_per_class = args.n
    classes = _int_list(args.classes) if args.classes else None
    out = _out_base(args, "samples.png")
    _hold_outputs(args, out, args.npz)
    chains = generate_sample_chains(model, data, cfg, classes, seed=args.seed)
    images, labels = chains.images, chains.labels
    g = cfg.generate
    width = grid_width(g, len(images))
    save_image_grid(images, out, nrow=width)
    print(f"wrote {out}")
    # each image's class, chain seed and, when the dataset's judge is cached, its verdict
    folder = judge_dir(data.info.name, cfg.data.image_size)
    judge = None
    if (folder / "model.pt").exists():
        judge = load_judge(data.info.name, folder, cfg.data.image_size)
    print(f"wrote {write_grid_record(out, chains, width, judge, folder, g.method)}")
    if args.npz:
        with atomic_write(args.npz, "wb") as fh:
            np.savez_compressed(
                fh,
                images=images.numpy(),
                labels=(labels if labels is not None else torch.full((len(images),), -1)).numpy(),
                method=np.array(g.method),
                dataset=np.array(meta["dataset"]),
            )
        print(f"wrote {args.npz}")
    return 0


def add_parser(sub) -> None:
    s = model_command(
        sub, "generate", "class-conditional samples from a trained model", cmd_generate
    )
    s.add_argument(
        "--method",
        choices=["descent", "sgld"],
        help="seeded descent on E(x,y)-E(x), or SGLD on the energy",
    )
    s.add_argument(
        "--unconditional",
        action="store_true",
        help="sample E(x) instead of one row per class (sgld)",
    )
    s.add_argument("--npz", help="also save the samples (images, labels) to this .npz")
    s.add_argument("--classes", help="comma list of class indices (default: all)")
    s.add_argument("--n", type=int, help="images per class")
    s.add_argument("--steps", type=int)
    s.add_argument("--radius", type=float, help="L2 radius around the seed")
    s.add_argument("--seed", type=int)
    s.add_argument(
        "--seeds",
        choices=["class", "pooled", "uniform"],
        help="seed distribution (default: the run's config, 'class')",
    )

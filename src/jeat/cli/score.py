"""``jeat score``: IS and FID of generated samples (judge and Inception-v3)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jeat.cli.common import _data_args, _hold_outputs
from jeat.data import load_dataset
from jeat.errors import JeatError


def _load_samples(path: str):
    """Images and labels of a ``jeat generate --npz`` file (or any .npz with ``images``)."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise JeatError(f"no samples file at {file}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            if "images" not in npz:
                raise JeatError(f"{file} has no 'images' array (keys: {', '.join(npz.files)})")
            images = torch.from_numpy(np.asarray(npz["images"], dtype=np.float32))
            labels = torch.from_numpy(npz["labels"]).long() if "labels" in npz else None
            dataset = str(npz["dataset"]) if "dataset" in npz else None
    except (OSError, ValueError) as exc:
        raise JeatError(f"cannot read samples from {file}: {exc}") from None
    if images.ndim == 3:  # N x H x W grey images
        images = images.unsqueeze(1)
    return images, labels, dataset


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from jeat.metrics import InceptionBackend, JudgeBackend, load_judge, score_samples
    from jeat.utils import write_json

    images, labels, made_for = _load_samples(args.samples)
    data = load_dataset(
        args.against, root=args.data_dir, download=args.download, image_size=args.image_size
    )
    if made_for is not None and made_for != data.info.name:
        print(f"note: the samples were generated for {made_for}, scored against {data.info.name}")
    n, n_real, splits = args.n, args.n_real, args.splits
    if args.quick:
        n, n_real, splits = n or 1000, n_real or 1000, 1
    gen = torch.Generator().manual_seed(args.seed)
    if n is not None and n < len(images):
        pick = torch.randperm(len(images), generator=gen)[:n]
        images = images[pick]
        labels = labels[pick] if labels is not None else None
    real, real_labels = (
        (data.x_train, data.y_train) if args.real == "train" else (data.x_test, data.y_test)
    )
    if n_real is not None and n_real < len(real):
        pick = torch.randperm(len(real), generator=gen)[:n_real]
        real, real_labels = real[pick], real_labels[pick]
    # the reference: the other split's real images scored against the same real images
    held_out, held_out_labels = None, None
    if args.reference == "held-out":
        held_out, held_out_labels = (
            (data.x_test, data.y_test) if args.real == "train" else (data.x_train, data.y_train)
        )
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".scores.json")
    _hold_outputs(args, out)
    backends = []
    if args.backend in ("auto", "judge"):
        backends.append(JudgeBackend(load_judge(data.info.name, args.judge, args.image_size)))
    if args.backend in ("auto", "inception"):
        try:
            backends.append(InceptionBackend(device=args.device, download=args.download))
        except JeatError as exc:
            if args.backend == "inception":
                raise
            print(f"Inception-v3 IS/FID skipped: {exc}")
    results = {}
    for backend in backends:
        s = score_samples(
            backend, images, real, labels, splits, real_labels=real_labels,
            held_out=held_out, held_out_labels=held_out_labels, seed=args.seed,
        )  # fmt: skip
        print(f"{backend.name:<13} {s.line()}")
        if s.reference_line():
            print(f"{'':<13} {s.reference_line()}")
        results[backend.name] = s.to_dict()
    write_json(
        out,
        {"samples": str(args.samples), "against": data.info.name, "real": args.real, **results},
    )
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    sc = sub.add_parser("score", help="IS / FID of generated samples (judge and Inception-v3)")
    sc.add_argument("samples", help=".npz with an 'images' array (jeat generate --npz)")
    sc.add_argument("--against", required=True, help="dataset whose real images are the reference")
    sc.add_argument("--real", choices=["train", "test"], default="train", help="reference split")
    sc.add_argument(
        "--reference",
        choices=["held-out", "none"],
        default="held-out",
        help="also score the other split's real images against the same real images: the "
        "floor every score is read against (default held-out)",
    )
    sc.add_argument(
        "--backend",
        choices=["auto", "judge", "inception"],
        default="auto",
        help="auto: the judge, plus Inception-v3 when available (default)",
    )
    sc.add_argument("--judge", help="judge run folder (default: the cached judge)")
    sc.add_argument("--n", type=int, help="score at most this many samples")
    sc.add_argument("--n-real", type=int, help="at most this many real images")
    sc.add_argument("--splits", type=int, default=10, help="IS splits (default 10)")
    sc.add_argument("--quick", action="store_true", help="1,000 samples, 1,000 real, 1 split")
    sc.add_argument("--seed", type=int, default=0, help="seed of the subsampling")
    sc.add_argument("--out", help="JSON output (default: SAMPLES.scores.json)")
    _data_args(sc, device="cpu")
    sc.set_defaults(func=cmd_score)

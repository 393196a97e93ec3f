"""``jeat attack``: adversarial examples for a model, as .npz and a clean/adversarial grid."""

from __future__ import annotations

import argparse

from jeat.cli.common import (
    _defence_line,
    _defended_name,
    _eval_setup,
    _hold_outputs,
    _out_base,
    attack_args,
    model_command,
    points_phrase,
)
from jeat.errors import JeatError


def cmd_attack(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from jeat.evaluate import build_attack, parse_attack
    from jeat.utils import atomic_write, save_image_grid

    model, meta, cfg, data, n, threat, context = _eval_setup(args)
    spec = parse_attack(args.attack)
    if spec.kind == "clean":
        raise JeatError("'clean' is not an attack; name one, e.g. --attack pgd20")
    out = _out_base(args, _defended_name(f"adv-{spec.kind}", meta) + ".npz")
    seed = 0 if args.seed is None else args.seed
    context.seed = seed
    built = build_attack(spec, threat, context)
    _hold_outputs(args, out)
    x, y = data.x_test[:n].to(context.device), data.y_test[:n].to(context.device)
    x_adv = x
    for _name, attack, _category in built.stages:  # composite attacks: their own cascade
        with torch.no_grad():
            alive = model(x_adv).argmax(1) == y
        idx = alive.nonzero().squeeze(1)
        if len(idx):
            gen = torch.Generator(device=x.device).manual_seed(seed)
            x_adv = x_adv.clone()
            x_adv[idx] = attack(model, x[idx], y[idx], generator=gen)
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        adv_pred = model(x_adv).argmax(1)
    clean_acc = 100 * float((clean_pred == y).float().mean())
    adv_acc = 100 * float(((adv_pred == y) & (clean_pred == y)).float().mean())
    if meta.get("defences"):
        print(_defence_line(meta))
    print(
        f"{spec.label} on {points_phrase(data, n)}: clean {clean_acc:.2f}%, under attack "
        f"{adv_acc:.2f}%"
    )
    with atomic_write(out, "wb") as fh:
        np.savez_compressed(
            fh,
            x=x.cpu().numpy(),
            x_adv=x_adv.cpu().numpy(),
            y=y.cpu().numpy(),
            pred_clean=clean_pred.cpu().numpy(),
            pred_adv=adv_pred.cpu().numpy(),
            attack=np.array(spec.label),
            dataset=np.array(meta["dataset"]),
            defences=np.array(meta.get("defences", []), dtype=str),
        )
    k = min(16, n)
    pairs = torch.stack([x[:k], x_adv[:k]], 1).flatten(0, 1).cpu()
    png = save_image_grid(pairs, out.with_suffix(".png"), nrow=8)
    print(f"wrote {out}\nwrote {png} (clean/adversarial pairs)")
    return 0


def add_parser(sub) -> None:
    s = model_command(sub, "attack", "craft adversarial examples for a trained model", cmd_attack)
    attack_args(s, "attack")
    s.add_argument("--attack", default="pgd20", help="one attack (see jeat attacks)")

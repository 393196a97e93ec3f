"""Defences jeat has never seen, and the honest models, through ``--diagnose --fix``.

The zoo is ``benchmarks/zoo/``: defence families from the literature (Tramer et al. 2020's
list of adaptive-attack case studies and Athalye et al. 2018's) written as a *user* would ship
them, plain ``nn.Module`` files that jeat knows nothing about, loaded the way a user loads
them (``jeat.sources.load_model("py:FILE:make", weights=...)``, what ``jeat eval --model
py:...`` does). Their networks are trained here on the digits (plain PyTorch, seconds each):
an undefended CNN (also the transfer source), a CNN on thermometer codes, two more CNNs for
the vote.

Per zoo row, on the first ``--n`` digits test points (L-inf eps 0.2):

* the naive table (``clean,pgd20``), the indicators raised and the remedies;
* the worst case after ``fix`` (probe rows included), the attacks it added and each one's cost;
* reference attacks on the same points: torchattacks' PGD-20 on the defended model (EOTPGD
  with 20 draws for a randomised one), pyautoattack standard (the ``rand`` version for a
  randomised model), and a transfer from the undefended network (torchattacks PGD-20 on it);
  the strongest of them, and the fix minus it (the issue asks for at most 3 points).

Per honest row (digits PGD-AT, TRADES, JEAT configs, lean: no final steps): the main job's
table, the indicators, whether ``fix`` runs a remedy, and the time of ``--diagnose`` over the
table's own time (the issue asks for at most 10%).

    OMP_NUM_THREADS=1 python benchmarks/diagnose_zoo.py --work /tmp/zoo \\
        --out benchmarks/results/diagnose_zoo

Every finished row goes to ``--out/results.json`` at once and is skipped on the next start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from common import LEAN_OVERRIDES, markdown_table, train_or_reuse
from torch import nn

from jeat.attacks import LinfBall
from jeat.config import load_config
from jeat.data import load_dataset
from jeat.diagnose import diagnose, fix, remedy_costs
from jeat.evaluate import evaluate
from jeat.sources import load_model

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo"
NAIVE = "clean,pgd20"
MAIN_TABLE = "clean,fgsm,pgd20,autoattack-fast"
# row -> (file in benchmarks/zoo, randomised, BPDA module name the user would give or None)
ZOO_ROWS: dict[str, tuple[str, bool, str | None]] = {
    "thermometer encoding": ("thermometer.py", False, None),
    "JPEG-style compression": ("jpeg.py", False, None),
    "random resizing and padding": ("randpad.py", True, None),
    "vote of three CNNs (integer outputs)": ("vote.py", False, None),
    "softmax at temperature 1000": ("hot_softmax.py", False, None),
    "TV denoising in NumPy (detached)": ("numpy_tv.py", False, None),
    # the same thermometer model with its module named: BPDA through a learned approximation
    "thermometer encoding, --bpda-module pre": ("thermometer.py", False, "pre"),
}
HONEST_ROWS = {"PGD-AT": "pgdat", "TRADES": "trades", "JEAT": "jeat"}


def _load_zoo(file: str):
    spec = importlib.util.spec_from_file_location(f"zoo_{file[:-3]}", ZOO / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """Standard training (Adam, cross-entropy, batch 64): the user's own recipe."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            sel = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[sel]), y[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def weights_for(name: str, work: Path, data) -> Path:
    """Train (or reuse) the networks of one zoo file; the state_dict its make() loads."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.pt"
    if path.exists():
        return path
    xt, yt = data.x_train, data.y_train
    if name == "cnn":
        torch.manual_seed(0)
        net = _train(_load_zoo("jpeg.py").CNN(1, 10), xt, yt, 20, 0)
        torch.save(net.state_dict(), path)
        return path
    base = torch.load(weights_for("cnn", work, data), weights_only=True)
    module = _load_zoo(name + ".py")
    model = module.make()
    if name == "thermometer":
        torch.manual_seed(1)
        model.net = _train(model.net, model.pre(xt), yt, 20, 1)
    elif name == "vote":
        model.members[0].load_state_dict(base)
        for k in (1, 2):
            torch.manual_seed(k)
            _train(model.members[k], xt, yt, 20, k)
    else:
        model.net.load_state_dict(base)
    torch.save(model.state_dict(), path)
    return path


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.as_tensor(model(x)).float().argmax(1)
    return 100.0 * float(((pred == y) & ok).float().mean())


def references(model, base, x, y, eps, randomised, seed=0) -> dict[str, Any]:
    """Robust accuracy of each reference attack on the same points (percent; None when the
    reference fails on this model, with the reason)."""
    import torchattacks

    torch.manual_seed(seed)
    with torch.no_grad():
        clean_ok = torch.as_tensor(model(x)).float().argmax(1) == y
    out: dict[str, Any] = {}
    for name, run in (
        (
            "torchattacks EOTPGD-20 (20 draws)" if randomised else "torchattacks PGD-20",
            lambda: (
                torchattacks.EOTPGD(model, eps=eps, alpha=eps / 4, steps=20, eot_iter=20)
                if randomised
                else torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
            )(x, y),
        ),
        (
            "transfer: torchattacks PGD-20 on the undefended CNN",
            lambda: torchattacks.PGD(base, eps=eps, alpha=eps / 4, steps=20, random_start=True)(
                x, y
            ),
        ),
    ):
        t0 = time.perf_counter()
        try:
            torch.manual_seed(seed)
            x_adv = run()
            torch.manual_seed(seed)
            out[name] = {"accuracy": _accuracy(model, x_adv, y, clean_ok)}
        except Exception as exc:  # the reference library fails on this model
            out[name] = {"accuracy": None, "error": f"{type(exc).__name__}: {exc}"[:160]}
        out[name]["seconds"] = time.perf_counter() - t0
    aa = "autoattack:version=rand" if randomised else "autoattack"
    t0 = time.perf_counter()
    try:
        acc = evaluate(model, x, y, ["clean", aa], LinfBall(eps), seed=seed).robust_accuracy
        out[f"pyautoattack {aa.partition(':')[2] or 'standard'}"] = {"accuracy": acc}
    except Exception as exc:
        out[f"pyautoattack {aa}"] = {"accuracy": None, "error": f"{type(exc).__name__}: {exc}"}
    out[list(out)[-1]]["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/jeat-zoo", help="folder of the trained networks")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/diagnose_zoo"))
    p.add_argument("--n", type=int, default=360, help="test points")
    p.add_argument("--rows", help="comma list of row names (default: all)")
    args = p.parse_args()
    data = load_dataset("digits")
    x, y = data.x_test[: args.n], data.y_test[: args.n]
    eps = 0.2
    threat = LinfBall(eps)
    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    results.setdefault("rows", {})
    results["n"] = args.n
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else [*HONEST_ROWS, *ZOO_ROWS]
    base = None
    for row in wanted:
        if row in results["rows"]:
            print(f"{row}: done, skipped")
            continue
        t_row = time.perf_counter()
        if row in HONEST_ROWS:
            cfg = load_config(f"digits-{HONEST_ROWS[row]}", LEAN_OVERRIDES)
            model = train_or_reuse(cfg, work / HONEST_ROWS[row], data)[0].eval()
            t0 = time.perf_counter()
            table = evaluate(model, x, y, MAIN_TABLE, threat, trace=True)
            t_table = time.perf_counter() - t0
            worst = table.robust_accuracy
            t0 = time.perf_counter()
            naive, dg = diagnose(model, x, y, MAIN_TABLE, threat, result=table)
            t_diag = time.perf_counter() - t0
            fixed, extra = fix(model, x, y, MAIN_TABLE, threat, dg, naive)
            entry = {
                "kind": "honest", "table": MAIN_TABLE, "worst": worst,
                "worst_with_probes": naive.robust_accuracy, "raised": dg.raised(),
                "fix_attacks": extra, "fixed_worst": fixed.robust_accuracy,
                "seconds": {"table": t_table, "diagnose": t_diag},
                "diagnose_over_table": t_diag / t_table,
            }  # fmt: skip
        else:
            file, randomised, module = ZOO_ROWS[row]
            stem = file[:-3]
            loaded = load_model(f"py:{ZOO / file}:make", weights=weights_for(stem, work, data))
            model = loaded.model
            if base is None:
                base = _load_zoo("jpeg.py").CNN(1, 10)
                base.load_state_dict(torch.load(weights_for("cnn", work, data), weights_only=True))
                base.eval()
            t0 = time.perf_counter()
            naive, dg = diagnose(model, x, y, NAIVE, threat, bpda_module=module)
            t_diag = time.perf_counter() - t0
            pgd20 = next(r.robust_after for r in naive.rows if r.attack == "pgd20")
            print(naive.table(), dg.table(), sep="\n", flush=True)
            t0 = time.perf_counter()
            fixed, extra = fix(model, x, y, NAIVE, threat, dg, naive, inputs=data.x_train)
            t_fix = time.perf_counter() - t0
            print(fixed.table(), flush=True)
            refs = references(model, base, x, y, eps, randomised)
            accs = [r["accuracy"] for r in refs.values() if r["accuracy"] is not None]
            strongest = min(accs) if accs else None
            entry = {
                "kind": "zoo", "file": f"benchmarks/zoo/{file}", "bpda_module": module,
                "table": NAIVE, "naive_pgd20": pgd20, "raised": dg.raised(),
                "remedies": dg.remedies(), "sigma": dg.sigma, "fix_attacks": extra,
                "fixed_worst": fixed.robust_accuracy,
                "rows": [[r.attack, r.attacked, r.broken, r.robust_after, r.seconds]
                         for r in fixed.rows],
                "costs": [vars(c) for c in remedy_costs(fixed, extra)],
                "references": refs, "strongest_reference": strongest,
                "fix_minus_strongest": None if strongest is None
                else fixed.robust_accuracy - strongest,
                "seconds": {"diagnose": t_diag, "fix": t_fix},
            }  # fmt: skip
        entry["machine"] = machine
        entry["row_seconds"] = time.perf_counter() - t_row
        results["rows"][row] = entry
        res_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{row}: {json.dumps(entry)[:1500]}", flush=True)
    write_table(results, out)


def write_table(results: dict[str, Any], out: Path) -> None:
    zoo, honest = [], []
    for name, r in results["rows"].items():
        if r["kind"] == "zoo":
            refs = "; ".join(
                f"{k} {v['accuracy']:.1f}" if v["accuracy"] is not None else f"{k}: fails"
                for k, v in r["references"].items()
            )
            costs = ", ".join(f"{c['attack']} {c['seconds']:.0f} s" for c in r["costs"])
            zoo.append([
                name, f"{r['naive_pgd20']:.1f}", ", ".join(r["raised"]) or "none",
                f"{r['fixed_worst']:.1f}", refs,
                "-" if r["strongest_reference"] is None else f"{r['strongest_reference']:.1f}",
                "-" if r["fix_minus_strongest"] is None else f"{r['fix_minus_strongest']:+.1f}",
                costs,
            ])  # fmt: skip
        elif r["kind"] == "honest":
            honest.append([
                name, f"{r['worst']:.1f}", ", ".join(r["raised"]) or "none",
                ", ".join(r["fix_attacks"]) or "none", f"{r['seconds']['table']:.1f}",
                f"{r['seconds']['diagnose']:.1f}", f"{100 * r['diagnose_over_table']:.1f}%",
            ])  # fmt: skip
    machines = sorted({r.get("machine", "?") for r in results["rows"].values()})
    text = (
        f"Digits, first {results['n']} test points, L-inf eps 0.2; {' / '.join(machines)}.\n\n"
        + markdown_table(
            [
                "defence (benchmarks/zoo)",
                "naive PGD-20 %",
                "indicators raised",
                "after --fix %",
                "reference attacks, robust %",
                "strongest reference %",
                "fix - strongest",
                "cost per remedy",
            ],
            zoo,
        )  # fmt: skip
        + "\n\n"
        + markdown_table(
            [
                "honest model",
                "main table %",
                "indicators raised",
                "remedies run",
                "table s",
                "diagnose s",
                "diagnose / table",
            ],
            honest,
        )  # fmt: skip
    )
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

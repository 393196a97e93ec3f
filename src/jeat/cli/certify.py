"""``jeat certify``: the WRM certificate against our attacks."""

from __future__ import annotations

import argparse

from jeat.cli.common import _csv, _data_args, _eps, _hold_outputs, _out_base, _run_data
from jeat.errors import JeatError


def cmd_certify(args: argparse.Namespace) -> int:
    from jeat.certify import wrm_certificate
    from jeat.runs import load_trained
    from jeat.utils import write_json

    if not args.wrm:
        raise JeatError("name a certificate: jeat certify RUN --wrm (the only one so far)")
    model, meta, cfg = load_trained(args.run, device=args.device)
    data = _run_data(cfg.data, args.data_dir, args.download)
    gamma = args.gamma
    if gamma is None:
        if cfg.objective.name != "wrm":
            raise JeatError(f"{args.run} was not trained with wrm; give the multiplier: --gamma G")
        gamma = float(cfg.objective.options.get("gamma", 2.0))
    rhos = [float(_eps(t)) for t in _csv(args.rho)]
    n = len(data.x_test) if args.n is None or args.n <= 0 else min(args.n, len(data.x_test))
    out = _out_base(args, "certify-wrm.json")
    _hold_outputs(args, out)
    cert = wrm_certificate(model, data.x_test[:n], data.y_test[:n], gamma, rhos)
    print(cert.table())
    write_json(out, {"dataset": meta["dataset"], "run": str(args.run), **cert.to_dict()})
    png = cert.plot(out.with_suffix(".png"))
    print(f"wrote {out}\nwrote {png}")
    if cert.violations:
        print(f"warning: {len(cert.violations)} attack(s) exceed the certified loss: the inner "
              "maximisation missed the maximum (non-smooth model or gamma too small)")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    cert = sub.add_parser("certify", help="certified bounds (WRM) against our attacks")
    cert.add_argument("run", help="run folder or checkpoint file")
    cert.add_argument("--wrm", action="store_true", help="the WRM Wasserstein certificate")
    cert.add_argument("--gamma", type=float, help="Lagrange multiplier (default: the run's)")
    cert.add_argument("--rho", default="0.1,0.5,1,2", help="transport budgets (mean ||dx||^2)")
    cert.add_argument("--n", type=int, default=500, help="test points (0: all)")
    cert.add_argument("--out", help="output JSON (default: RUN/certify-wrm.json, plus .png)")
    _data_args(cert, device="auto")
    cert.set_defaults(func=cmd_certify)

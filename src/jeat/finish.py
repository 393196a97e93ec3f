"""A run's final steps, after its last epoch: the robustness table and curve, a sample grid,
the energy analysis, judge scores and the report, each one switched by the config's
``final_*`` keys. They read and write the run folder (:mod:`jeat.runs`); the loop itself is
:mod:`jeat.train`.

``jeat train`` is :func:`train_and_finish`: :func:`jeat.train.train`, then :func:`finish_run`.
``jeat eval``, ``jeat generate`` and ``jeat analyze`` call the same step functions on any model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jeat import distributed
from jeat.config import TrainConfig, validate_config
from jeat.data import ImageDataset
from jeat.errors import JeatError
from jeat.evaluate import EvalContext, EvalResult, evaluate
from jeat.locks import hold_folder
from jeat.runs import eval_threat
from jeat.samplers import Samples, generate_chains
from jeat.sanity import Curve, curve_budgets, robustness_curve, write_curve
from jeat.train import TRAIN_HINT, TrainResult, train
from jeat.utils import atomic_write, derive_seed, grid_layout, save_image_grid, write_json

__all__ = [
    "train_and_finish",
    "finish_run",
    "final_evaluation",
    "final_curve",
    "generate_samples",
    "generate_sample_chains",
    "write_grid_record",
    "final_analysis",
    "final_scores",
    "grid_width",
]


def train_and_finish(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    data: ImageDataset | None = None,
    argv: list[str] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """``jeat train``: :func:`jeat.train.train` (same arguments), then, once the run is complete
    and in the process that writes the folder (rank 0 under ``torchrun``), :func:`finish_run`.
    One process holds the run folder throughout (:mod:`jeat.locks`; under torchrun rank 0
    holds it for the loop, then again for the final steps)."""
    with contextlib.ExitStack() as stack:
        if not distributed.from_env().enabled:
            validate_config(cfg)  # before the folder is touched
            stack.enter_context(hold_folder(out, hint=TRAIN_HINT))
        result = train(cfg, out, resume=resume, data=data, argv=argv, stop_after=stop_after)
        if not result.complete or not distributed.from_env().is_main:
            return result
        return finish_run(cfg, result)


def finish_run(cfg: TrainConfig, result: TrainResult) -> TrainResult:
    """Run the final steps that ``cfg.final_*`` ask for on a complete run and write their files
    into its folder; returns ``result`` with ``eval`` set when the table was computed."""
    if not result.complete or result.data is None:
        raise JeatError(f"{result.paths.root} is not a complete run; finish training it first")
    with hold_folder(result.paths.root, hint=TRAIN_HINT):
        return _finish(cfg, result)


def _finish(cfg: TrainConfig, result: TrainResult) -> TrainResult:
    assert result.data is not None
    paths, model, data = result.paths, result.model, result.data
    full = result.full_data if result.full_data is not None else data
    model.eval()
    result_eval = None
    if cfg.final_eval:
        result_eval = final_evaluation(cfg, model, data)
        payload = {"dataset": data.info.name, **result_eval.to_dict()}
        print(result_eval.table())
        if cfg.eval.curve:
            curve = final_curve(cfg, model, data)
            payload["curve"] = curve.to_dict()
            for path in write_curve(curve, paths.eval):
                print(f"wrote {path}")
        write_json(paths.eval, payload)
        with atomic_write(paths.eval.with_suffix(".md"), "w") as fh:
            fh.write(result_eval.markdown())
        print(f"wrote {paths.eval}")
    chains = None
    if cfg.final_samples:
        chains = generate_sample_chains(model, data, cfg)
        width = grid_width(cfg.generate, len(chains.images))
        save_image_grid(chains.images, paths.samples, nrow=width)
        print(f"wrote {paths.samples}")
    if cfg.final_analysis:
        analysis = final_analysis({paths.root.name: (model, cfg)}, data, paths.analysis)
        print(analysis.table())
        print(f"wrote {paths.analysis}/")
    if cfg.final_scores:
        scores = final_scores(cfg, model, full, paths.scores)
        print(scores.line())
        ref = scores.reference_line()
        if ref is not None:
            print(ref)
        print(f"wrote {paths.scores}")
    if chains is not None:  # after the scores, which may just have trained the judge
        from jeat.metrics import judge_dir, load_judge

        folder = judge_dir(data.info.name, cfg.data.image_size)
        judge = None
        if (folder / "model.pt").exists():
            judge = load_judge(data.info.name, folder, cfg.data.image_size)
        width = grid_width(cfg.generate, len(chains.images))
        record = write_grid_record(paths.samples, chains, width, judge, folder, cfg.generate.method)
        print(f"wrote {record}")
    if cfg.final_report:
        from jeat.report import write_report

        print(f"wrote {write_report(paths.root)}")
    return dataclasses.replace(result, eval=result_eval)


def final_evaluation(
    cfg: TrainConfig,
    model: nn.Module,
    data: ImageDataset,
    attacks: list[str] | None = None,
    mode: str | None = None,
    context: EvalContext | None = None,
    progress: bool = False,
    seed: int | None = None,
    shards: distributed.DistContext | None = None,
    order: str = "cost",
    trace: bool = False,
) -> EvalResult:
    """The robustness table on the first ``eval.n`` test points (``eval.mode`` unless given;
    attack seeds from the run's seed unless ``seed`` is given); ``shards`` splits it across
    the processes of a torchrun job, ``order`` is the cascade's attack order and ``trace``
    records the loss traces (see :func:`jeat.evaluate.evaluate`)."""
    n = len(data.x_test) if cfg.eval.n is None else min(cfg.eval.n, len(data.x_test))
    return evaluate(
        model,
        data.x_test[:n],
        data.y_test[:n],
        attacks or cfg.eval.attacks,
        eval_threat(cfg, data.info),
        batch_size=cfg.eval.batch_size,
        seed=derive_seed(cfg.seed, 11) if seed is None else seed,
        mode=mode or cfg.eval.mode,
        num_classes=data.info.num_classes,
        context=context,
        progress=progress,
        shards=shards,
        order=order,
        trace=trace,
    )


def generate_samples(
    model: nn.Module,
    data: ImageDataset,
    cfg: TrainConfig,
    classes: list[int] | None = None,
    n_per_class: int | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples as ``cfg.generate`` describes (see :func:`jeat.samplers.generate`)."""
    s = generate_sample_chains(model, data, cfg, classes, n_per_class, seed)
    return s.images, s.labels


def generate_sample_chains(
    model: nn.Module,
    data: ImageDataset,
    cfg: TrainConfig,
    classes: list[int] | None = None,
    n_per_class: int | None = None,
    seed: int | None = None,
) -> Samples:
    """:func:`generate_samples` with each image's chain seed
    (:func:`jeat.samplers.generate_chains`); the base seed derives from the run's seed unless
    ``seed`` is given."""
    return generate_chains(
        model,
        data,
        cfg.generate,
        classes=classes,
        n_per_class=n_per_class,
        seed=derive_seed(cfg.seed if seed is None else seed, 13),
    )


def write_grid_record(
    grid: str | Path,
    samples: Samples,
    nrow: int,
    judge: nn.Module | None = None,
    judge_folder: str | Path | None = None,
    method: str | None = None,
) -> Path:
    """Write ``GRID.json`` beside the sample grid ``GRID`` (a PNG that
    :func:`jeat.utils.save_image_grid` wrote from ``samples.images``, ``nrow`` per row): the
    grid's layout (:func:`jeat.utils.grid_layout`) and, per image in grid order, its row and
    column, the class it was made for (-1: unconditional), its chain seed and, when ``judge``
    is given, the judge's verdict (predicted class and confidence). The report shows the
    verdicts on the grid. Returns the JSON's path."""
    images = samples.images
    if len(samples.seeds) != len(images):
        raise JeatError(f"{len(samples.seeds)} chain seeds for {len(images)} images")
    layout = grid_layout(len(images), images.shape[-2], images.shape[-1], nrow)
    labels = samples.labels.tolist() if samples.labels is not None else [-1] * len(images)
    verdicts = None
    if judge is not None:
        from jeat.metrics import judge_verdicts

        pred, conf = judge_verdicts(judge, images)
        verdicts = list(zip(pred.tolist(), conf.tolist(), strict=True))
    rows = []
    for i, (label, chain) in enumerate(zip(labels, samples.seeds, strict=True)):
        r, c = divmod(i, layout["columns"])
        row: dict[str, Any] = {"row": r, "col": c, "label": int(label), "seed": int(chain)}
        if verdicts is not None:
            row["judge_class"], row["judge_confidence"] = int(verdicts[i][0]), verdicts[i][1]
        rows.append(row)
    path = Path(grid).with_suffix(".json")
    write_json(
        path,
        {
            "grid": Path(grid).name,
            "method": method,
            "layout": layout,
            "judge": None if judge is None else str(judge_folder or ""),
            "images": rows,
        },
    )
    return path


def final_curve(cfg: TrainConfig, model: nn.Module, data: ImageDataset) -> Curve:
    """Accuracy under ``eval.curve`` at :data:`jeat.sanity.CURVE_FACTORS` times the budget
    (:func:`jeat.sanity.curve_budgets`), on the final evaluation's points."""
    n = len(data.x_test) if cfg.eval.n is None else min(cfg.eval.n, len(data.x_test))
    threat = eval_threat(cfg, data.info)
    return robustness_curve(
        model,
        data.x_test[:n],
        data.y_test[:n],
        str(cfg.eval.curve),
        threat,
        curve_budgets(threat, data.info.shape),
        cfg.eval.batch_size,
        derive_seed(cfg.seed, 11),
    )


def final_analysis(
    runs: dict[str, tuple[nn.Module, TrainConfig]],
    data: ImageDataset,
    out_dir: str | Path | None,
    n: int | None = None,
    grid: int | None = None,
    samples_per_class: int | None = None,
    eps: float | None = None,
    seed: int = 0,
    plots: bool = True,
):
    """:func:`jeat.analysis.analyze` for trained runs ``{name: (model, config)}`` on the first
    ``n`` test images (default ``analysis.n`` of the first run's config), with each model's
    own samples (``analysis.samples_per_class`` per class, its ``generate`` settings) in the
    histograms. ``eps`` (L-inf) defaults to the run's evaluation budget when that is L-inf,
    else the dataset's L-inf budget."""
    from jeat.analysis import analyze

    if not runs:
        raise JeatError("give at least one run to analyse")
    first = next(iter(runs.values()))[1]
    a = first.analysis
    n = min(a.n if n is None else n, len(data.x_test))
    if eps is None:
        norm = first.eval.norm.lower()
        eps = eval_threat(first, data.info).eps if norm == "linf" else data.info.eps_linf
    per_class = a.samples_per_class if samples_per_class is None else samples_per_class
    generated = None
    if per_class > 0:
        generated = {
            name: generate_samples(model, data, cfg, n_per_class=per_class)[0]
            for name, (model, cfg) in runs.items()
        }
    return analyze(
        {name: model for name, (model, _) in runs.items()},
        data.x_test[:n],
        data.y_test[:n],
        eps=float(eps),
        out_dir=out_dir,
        grid=a.grid if grid is None else grid,
        generated=generated,
        seed=seed,
        plots=plots,
    )


def final_scores(
    cfg: TrainConfig,
    model: nn.Module,
    data: ImageDataset,
    out: str | Path | None = None,
    judge: str | Path | None = None,
):
    """Judge scores (IS, FID, precision, recall, density, coverage, within-class diversity;
    :func:`jeat.metrics.score_samples`) of ``analysis.score_per_class`` samples per class (the
    run's ``generate`` settings) against the training images, with 10 IS splits, and the same
    scores of as many real test images (the reference, the floor of every number). The judge
    is the cached one of the dataset (trained and cached first when there is none) or the run
    at ``judge``. Writes ``out`` (JSON) when given; returns the
    :class:`jeat.metrics.GenerationScores`."""
    from jeat.metrics import JudgeBackend, judge_dir, load_judge, score_samples, train_judge

    name, size = data.info.name, cfg.data.image_size
    folder = Path(judge) if judge is not None else judge_dir(name, size)
    if judge is None and not (folder / "model.pt").exists():
        print(f"no judge cached for {name}: training one into {folder} (once per dataset)")
        train_judge(
            name,
            data=data,
            epochs=cfg.analysis.judge_epochs,
            progress=cfg.progress,
            image_size=size,
        )
    backend = JudgeBackend(load_judge(name, folder, size))
    per_class = cfg.analysis.score_per_class
    images, labels = generate_samples(model, data, cfg, n_per_class=per_class)
    scores = score_samples(
        backend,
        images,
        data.x_train,
        labels,
        splits=10,
        real_labels=data.y_train,
        held_out=data.x_test,
        held_out_labels=data.y_test,
    )
    if out is not None:
        write_json(
            out,
            {
                "dataset": name,
                "method": cfg.generate.method,
                "conditional": cfg.generate.conditional,
                "per_class": per_class,
                "real": "train",
                "reference": "test",  # judge.reference: real test images scored alike
                "judge_dir": str(folder),
                "judge": scores.to_dict(),
            },
        )
    return scores


def grid_width(g: Any, n_images: int) -> int:
    """Images per grid row: one row per class, or a square for unconditional samples."""
    return g.n_per_class if g.conditional else int(math.ceil(math.sqrt(n_images)))

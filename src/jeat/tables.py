"""Robustness tables: one row per attack stage on the same points, the worst case, the
per-point outcomes, and their text, Markdown, CSV and JSON forms; the masking rules that a
finished table can check (:func:`table_warnings`).

Accuracy under attack follows RobustBench: a point counts as robust only if it is classified
correctly when clean *and* after the attack. The runner that fills a table is
:mod:`jeat.evaluate`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from jeat.specs import AttackSpec, BuiltAttack

if TYPE_CHECKING:
    from jeat.attacks.trace import LossTrace

__all__ = ["AttackResult", "EvalResult", "table_warnings", "MASKING", "pct"]


@dataclass
class AttackResult:
    attack: str
    category: str
    threat: str
    n: int  # points in the table
    attacked: int  # points this attack ran on
    broken: int  # of those, how many it misclassified
    accuracy: float | None  # percent of all n robust under this attack alone (None: unknown)
    robust_after: float  # percent of all n robust under every row so far (the worst case)
    seconds: float
    group: str = ""  # the attack as written (AutoAttack's components share one)


@dataclass
class EvalResult:
    threat: str
    eps: float
    mode: str
    rows: list[AttackResult]
    robust_accuracy: float  # worst case over all attacks, percent
    warnings: list[str] = field(default_factory=list)
    robust: Tensor | None = field(default=None, repr=False)  # per point: survived everything
    # per point and stage: 1 survived, 0 broken, -1 not attacked (cascade: broken earlier)
    outcomes: dict[str, Tensor] = field(default_factory=dict, repr=False)
    labels: Tensor | None = field(default=None, repr=False)
    # per traced stage: the loss traces of its gradient attack (``evaluate(trace=True)``)
    traces: dict[str, LossTrace] = field(default_factory=dict, repr=False)
    specs: dict[str, AttackSpec] = field(default_factory=dict, repr=False)  # per stage
    point_notes: list[str] = field(default_factory=list, repr=False)  # per point (diagnosis)
    # what the points are: "360 of 360 images of npz:..., all of them (...)"; "" says "N points"
    points: str = ""

    def broken_by(self) -> list[str]:
        """Per point, the first row (table order) that misclassified it; "" when robust."""
        n = self.n
        out = [""] * n
        for name, o in self.outcomes.items():
            for i in (o == 0).nonzero().squeeze(1).tolist():
                if not out[i]:
                    out[i] = name
        return out

    def per_point_csv(self) -> str:
        """One row per point: index, label, the first row that broke it, whether it survived
        everything, then each row's outcome (1 survived, 0 broken, empty: not attacked).

        With loss traces (``evaluate(trace=True)``), each traced row adds its loss trace
        summary: the loss at the first and last iterate and its maximum (of the run that
        reached the highest final loss), and the first step at which an iterate fooled the
        model (empty: none did). With a diagnosis, ``indicators`` lists what each point
        raised (``row=indicator;...``)."""
        buf = io.StringIO()
        names = list(self.outcomes)
        traced = [k for k in names if k in self.traces]
        summaries = {k: [t.tolist() for t in self.traces[k].summary()] for k in traced}
        parts = ("loss_first", "loss_last", "loss_max", "fooled_at")
        trace_head = [f"{k}:{part}" for k in traced for part in parts]
        writer = csv.writer(buf, lineterminator="\n")
        extra = ["indicators"] if self.point_notes else []
        writer.writerow(["index", "label", "broken_by", "robust", *names, *trace_head, *extra])
        broken = self.broken_by()
        labels = self.labels.tolist() if self.labels is not None else [""] * self.n
        robust = self.robust.tolist() if self.robust is not None else [""] * self.n
        cols = [self.outcomes[k].tolist() for k in names]
        for i in range(self.n):
            cells = ["" if c[i] < 0 else str(c[i]) for c in cols]
            for k in traced:
                attacked = self.outcomes[k][i] >= 0
                first, last, top, at = (v[i] for v in summaries[k])
                cells += (
                    [_num(first), _num(last), _num(top), "" if at < 0 else str(at)]
                    if attacked
                    else ["", "", "", ""]
                )
            notes = [self.point_notes[i]] if self.point_notes else []
            writer.writerow([i, labels[i], broken[i], int(robust[i]), *cells, *notes])
        return buf.getvalue()

    def add_found(
        self,
        name: str,
        category: str,
        threat: str,
        attacked: Tensor,
        broken: Tensor,
        seconds: float = 0.0,
    ) -> None:
        """Append a row for points broken outside this table (a diagnosis probe): ``attacked``
        and ``broken`` are bool masks over the table's points; a point counts only while it
        is still robust, so the worst case can only fall."""
        assert self.robust is not None
        while name in self.outcomes:
            name = f"{name} (again)"
        attacked = attacked.cpu() & self.robust
        broken = broken.cpu() & attacked
        outcome = torch.full((self.n,), -1, dtype=torch.int8)
        outcome[attacked] = 1
        outcome[broken] = 0
        self.outcomes[name] = outcome
        self.robust = self.robust & ~broken
        n = self.n
        after = 100.0 * float(self.robust.sum()) / max(1, n)
        self.rows.append(
            AttackResult(
                name,
                category,
                threat,
                n,
                int(attacked.sum()),
                int(broken.sum()),
                None,
                after,
                seconds,
                name,
            )  # fmt: skip
        )
        self.robust_accuracy = after

    def describe_points(self) -> str:
        return self.points or f"{self.n} points"

    @property
    def n(self) -> int:
        return self.rows[0].n if self.rows else 0

    def row(self, name: str) -> AttackResult:
        for r in self.rows:
            if r.attack == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "points": self.describe_points(),
            "threat": self.threat,
            "eps": self.eps,
            "mode": self.mode,
            "robust_accuracy": self.robust_accuracy,
            "attacks": [asdict(r) for r in self.rows],
            "warnings": list(self.warnings),
        }

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["attack", "threat", "attacked", "broken", "accuracy %", "robust after %", "s"]
        body = []
        for r in self.rows:
            acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
            body.append(
                [
                    r.attack,
                    r.threat,
                    str(r.attacked),
                    str(r.broken),
                    acc,
                    f"{r.robust_after:.2f}",
                    f"{r.seconds:.1f}",
                ]
            )
        body.append(["worst case", "", "", "", f"{self.robust_accuracy:.2f}", "", ""])
        return head, body

    def table(self) -> str:
        head, body = self._cells()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def fmt(row: list[str]) -> str:
            cells = enumerate(zip(row, widths, strict=True))
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in cells)

        lines = [f"{self.mode} evaluation on {self.describe_points()}, threat {self.threat} "
                 f"{self.eps:.4g}"]  # fmt: skip
        lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def markdown(self) -> str:
        head, body = self._cells()
        lines = [
            f"{self.mode.capitalize()} evaluation on {self.describe_points()}, threat "
            f"{self.threat} ε = {self.eps:.4g}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(row) + " |" for row in body),
        ]
        if self.warnings:
            lines += ["", "**Sanity warnings** (possible gradient masking):", ""]
            lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        fields = list(AttackResult.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow(asdict(r))
        return buf.getvalue()


def _num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4g}"


def pct(count: Tensor | int, n: int) -> float:
    return 100.0 * float(count) / max(1, n)


MASKING = "a likely sign of gradient masking"


def table_warnings(
    result: EvalResult, built: list[BuiltAttack], tolerance: float = 3.0
) -> list[str]:
    """The masking rules a finished table can check (rules 2 and 3 of :mod:`jeat.sanity`: more
    steps never help the defender; white-box attacks beat black-box and transfer ones), plus the
    reference AutoAttack's own warnings. Only rows under the same threat model are compared."""
    out: list[str] = []
    meta = {}
    for b in built:
        for name, _, _ in b.stages:
            meta[name] = b
    rows = [r for r in result.rows if r.category != "clean"]
    n = max(1, result.n)
    # at least two points of slack: one point flips with the random start on small tables
    tolerance = max(tolerance, 200.0 / n)
    for i, r in enumerate(rows):
        b = meta.get(r.attack)
        earlier = [p for p in rows[:i] if p.threat == r.threat]
        if result.mode == "cascade":
            extra = 100.0 * r.broken / n
            if extra <= tolerance:
                continue
            white = [p for p in earlier if p.category == "white-box"]
            if r.category in ("black-box", "transfer") and white:
                out.append(
                    f"{r.attack} ({r.category}) broke {r.broken} points ({extra:.1f}% of all) "
                    f"that survived the white-box attacks before it "
                    f"({', '.join(p.attack for p in white)}): white-box attacks should be "
                    f"stronger; {MASKING}"
                )
            stronger = [
                p
                for p in white
                if b is not None
                and b.steps is not None
                and (pb := meta.get(p.attack)) is not None
                and pb.loss == b.loss
                and (pb.steps or 0) > b.steps
            ]
            if r.category == "white-box" and stronger:
                out.append(
                    f"{r.attack} ({b.steps} steps) broke {r.broken} points ({extra:.1f}%) that "
                    f"survived {stronger[0].attack} ({meta[stronger[0].attack].steps} steps): "
                    f"more steps should never help the defender; {MASKING}"
                )
        else:
            if r.accuracy is None:
                continue
            white = [p for p in earlier + rows[i + 1 :] if p.threat == r.threat]
            white = [p for p in white if p.category == "white-box" and p.accuracy is not None]
            if r.category in ("black-box", "transfer") and white:
                best = min(white, key=lambda p: p.accuracy)
                if r.accuracy < best.accuracy - tolerance:
                    out.append(
                        f"{r.attack} ({r.category}) reaches {r.accuracy:.1f}% but the best "
                        f"white-box attack only {best.attack} {best.accuracy:.1f}%: white-box "
                        f"attacks should be stronger; {MASKING}"
                    )
            if r.category == "white-box" and b is not None and b.steps is not None:
                for p in white:
                    pb = meta.get(p.attack)
                    if (
                        pb is not None
                        and pb.loss == b.loss
                        and pb.steps is not None
                        and b.steps > pb.steps
                        and r.accuracy > p.accuracy + tolerance
                    ):
                        out.append(
                            f"{r.attack} ({b.steps} steps) leaves {r.accuracy:.1f}% but "
                            f"{p.attack} ({pb.steps} steps) {p.accuracy:.1f}%: more steps "
                            f"should never help the defender; {MASKING}"
                        )
    for b in built:
        for w in b.warnings:
            out.append(f"{b.spec.label} (reference implementation): {w}")
    return out

"""Shared fixtures: small models trained once per test session on the embedded digits data."""

from __future__ import annotations

from pathlib import Path

import pytest

from jeat.config import load_config
from jeat.data import load_dataset
from jeat.train import train

# Small budgets that keep each model to a few seconds on a 2-core CPU.
FAST = ["progress=false", "final_eval=false", "final_samples=false", "eval.epoch_n=0"]


def train_digits(root: Path, objective: str, epochs: int = 12, seed: int = 0, extra=()):
    cfg = load_config(
        "digits-pgdat",
        [f"objective.name={objective}", f"epochs={epochs}", f"seed={seed}", *FAST, *extra],
    )
    return train(cfg, root / f"{objective}-s{seed}-w", data=load_dataset("digits")).model


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def standard_model(tmp_path_factory):
    return train_digits(tmp_path_factory.mktemp("runs"), "standard")


@pytest.fixture(scope="session")
def pgdat_model(tmp_path_factory):
    return train_digits(tmp_path_factory.mktemp("runs"), "pgd-at")

"""Threat models and the attack zoo.

White-box attacks are written here (PGD with CE, CW-margin and DLR losses, FGSM, targeted
variants, ROA occlusion, SGM transfer); AutoAttack and the Square black-box attack come from
the reference implementation (``pyautoattack``) behind a thin adapter. Every attack is a
callable ``attack(model, x, y, generator=None, check=True) -> x_adv`` on pixels in [0, 1].
"""

from jeat.attacks.base import Attack, LogitsModel, check_images, logits_of, model_mode, model_width
from jeat.attacks.external import AutoAttack, Square
from jeat.attacks.occlusion import ROA, Occlusion
from jeat.attacks.pgd import BPDA, FGSM, LOSSES, PGD, MultiTargeted, Unroll, attack_loss
from jeat.attacks.threats import L2Ball, LinfBall, ThreatModel, flat_norm, make_threat
from jeat.attacks.transfer import SGM, Transfer, skip_gradient

__all__ = [
    "Attack",
    "LogitsModel",
    "check_images",
    "logits_of",
    "model_mode",
    "model_width",
    "BPDA",
    "Unroll",
    "FGSM",
    "LOSSES",
    "PGD",
    "MultiTargeted",
    "attack_loss",
    "L2Ball",
    "LinfBall",
    "ThreatModel",
    "flat_norm",
    "make_threat",
    "AutoAttack",
    "Square",
    "ROA",
    "Occlusion",
    "SGM",
    "Transfer",
    "skip_gradient",
]

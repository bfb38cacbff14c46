"""Training methods, one module each; ``METHODS`` maps the config's ``method.name`` to them."""

from mmtard.methods.ard import ARD
from mmtard.methods.base import Method, Teacher
from mmtard.methods.mmt_ard import MMTARD
from mmtard.methods.mtard import MTARD
from mmtard.methods.supervised import FARE, PMGAFT, CleanFineTune, TeCoA

METHODS: dict[str, type[Method]] = {
    "mmt_ard": MMTARD,
    "ard": ARD,
    "mtard": MTARD,
    "tecoa": TeCoA,
    "fare": FARE,
    "pmg_aft": PMGAFT,
    "clean_ft": CleanFineTune,
}

#: methods that train a model without teachers (used by ``mmtard train-teacher``)
TEACHER_METHODS = ("clean_ft", "tecoa", "fare", "pmg_aft")

__all__ = ["METHODS", "TEACHER_METHODS", "Method", "Teacher"]

"""results.json: its schema, validation, merging, and the sanity checks every evaluation reports.

Schema (accuracies in percent; other keys may be added, these stay)::

    {
      "schema": 1,
      "models": {
        ROW: {
          "arch": NAME, "weights": PATH-OR-TAG-OR-null, "undefended": BOOL, "forward": MODEL_FORWARD,
          "attack": {...},                       # the attack this row was evaluated with
          "datasets": {
            DATASET: {"n": INT, "clean": FLOAT, "robust": {"1/255": FLOAT, ...},
                      "kind": "zeroshot" | "classification", "n_classes": INT, "n_total": INT,
                      "image_size": INT | null}     # pixels the set was attacked at (null: native)
          },
          "average": {"datasets": [NAMES], "clean": FLOAT | null, "robust": {"1/255": FLOAT, ...}}
        }
      },
      "attack": {"name", "iterations", "norm", "eps": [...], "version", "attacks", ...},
      "created": ISO-TIME,
      "warnings": [STR, ...],
      "sanity": [{"check", "row", "dataset", "eps", "message"}, ...]   # failed checks only
    }

``average`` is the zero-shot average: the mean over the row's datasets of kind ``zeroshot``
(classification sets such as ImageNet or the world's classification split are left out, as in
the paper's tables); an eps enters it only when every one of those datasets has it.

Merging (:func:`merge_results`): rows are unioned; when the same row and dataset appear in two
files, the file given later wins and a warning says so. That makes "re-evaluate one dataset and
merge it over the old results" a one-liner, and never loses the fact that something was replaced.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable

from mmtard.checkpoint import atomic_write_text
from mmtard.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: How mmtard runs models, recorded in every results row, sample record and training checkpoint:
#: 2 since OpenAI-derived weights get QuickGELU and the in-model resize is the release's bicubic.
#: What was written without it came from an older mmtard (GELU for OpenAI weights, and a bilinear
#: or antialiased resize): such records are not resumed, such rows not merged with version-2 ones,
#: and such training runs not resumed.
MODEL_FORWARD = 2
RESULTS_NAME = "results.json"
KINDS = ("zeroshot", "classification")
UNDEFENDED_NAMES = ("undefended",)
# An undefended model should fall to (near) zero at the largest eps; above this (percent) it is
# flagged, since it usually means gradient masking or an attack that did not run properly.
UNDEFENDED_MAX_ROBUST = 5.0


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def eps_value(key: str) -> float:
    """Numeric value of an eps key such as ``4/255`` or ``0.5`` (for sorting)."""
    if "/" in key:
        num, den = key.split("/", 1)
        return float(Fraction(num.strip()) / Fraction(den.strip()))
    return float(key)


def sorted_eps(keys: Iterable[str]) -> list[str]:
    return sorted(set(keys), key=eps_value)


def write_json_atomic(obj: dict, path: str | Path) -> Path:
    """Write JSON through a temporary file and a durable rename, so a crash never leaves half a
    file, and a failed write names ``path`` and leaves the previous file whole."""
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


# ----------------------------------------------------------------------------- summaries
def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def zeroshot_average(datasets: dict) -> dict:
    """The ``average`` block of a row from its ``datasets`` block."""
    names = sorted(n for n, d in datasets.items() if d.get("kind", "zeroshot") == "zeroshot")
    if not names:
        return {"datasets": [], "clean": None, "robust": {}}
    common = set.intersection(*(set(datasets[n]["robust"]) for n in names))
    return {
        "datasets": names,
        "clean": _mean([datasets[n]["clean"] for n in names]),
        "robust": {e: _mean([datasets[n]["robust"][e] for n in names]) for e in sorted_eps(common)},
    }


# ----------------------------------------------------------------------------- validation
def _fail(where: str, what: str) -> None:
    raise DataError(f"results: {where}: {what}")


def _check_number(value, where: str, percent: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"expected a finite number, got {value!r}")
    if percent and not 0.0 <= value <= 100.0:
        _fail(where, f"{value} is not a percentage in [0, 100]")


def _check_eps_map(robust, where: str) -> None:
    if not isinstance(robust, dict):
        _fail(where, "expected an object eps -> accuracy")
    for key, value in robust.items():
        try:
            eps_value(key)
        except (ValueError, ZeroDivisionError):
            _fail(where, f"eps key {key!r} is not like '1/255' or '0.5'")
        _check_number(value, f"{where}[{key!r}]")


def _validate_row(row: str, entry) -> None:
    where = f"models[{row!r}]"
    if not isinstance(entry, dict):
        _fail(where, "expected an object")
    for key in ("arch", "weights", "datasets", "average"):
        if key not in entry:
            _fail(where, f"missing key {key!r}")
    if not isinstance(entry["arch"], str):
        _fail(f"{where}.arch", "expected a string")
    if entry["weights"] is not None and not isinstance(entry["weights"], str):
        _fail(f"{where}.weights", "expected a string or null")
    if not isinstance(entry["datasets"], dict):
        _fail(f"{where}.datasets", "expected an object")
    for name, ds in entry["datasets"].items():
        dwhere = f"{where}.datasets[{name!r}]"
        if not isinstance(ds, dict):
            _fail(dwhere, "expected an object")
        for key in ("n", "clean", "robust"):
            if key not in ds:
                _fail(dwhere, f"missing key {key!r}")
        if isinstance(ds["n"], bool) or not isinstance(ds["n"], int) or ds["n"] < 0:
            _fail(f"{dwhere}.n", f"expected a non-negative integer, got {ds['n']!r}")
        _check_number(ds["clean"], f"{dwhere}.clean")
        _check_eps_map(ds["robust"], f"{dwhere}.robust")
        if ds.get("kind", "zeroshot") not in KINDS:
            _fail(f"{dwhere}.kind", f"expected one of {KINDS}, got {ds.get('kind')!r}")
    avg = entry["average"]
    if not isinstance(avg, dict):
        _fail(f"{where}.average", "expected an object")
    if avg.get("clean") is not None:
        _check_number(avg["clean"], f"{where}.average.clean")
    if "robust" in avg:
        _check_eps_map(avg["robust"], f"{where}.average.robust")


def validate_results(obj) -> dict:
    """Check ``obj`` against the results.json schema; return it unchanged or raise DataError
    naming the first offending key."""
    if not isinstance(obj, dict):
        _fail("top level", "expected an object")
    for key in ("models", "attack", "created", "warnings", "sanity"):
        if key not in obj:
            _fail("top level", f"missing key {key!r}")
    if not isinstance(obj["models"], dict):
        _fail("models", "expected an object row -> results")
    for row, entry in obj["models"].items():
        _validate_row(row, entry)
    if not isinstance(obj["attack"], dict):
        _fail("attack", "expected an object")
    if not isinstance(obj["created"], str):
        _fail("created", "expected an ISO time string")
    try:
        _dt.datetime.fromisoformat(obj["created"])
    except ValueError:
        _fail("created", f"{obj['created']!r} is not an ISO time")
    if not isinstance(obj["warnings"], list) or not all(isinstance(w, str) for w in obj["warnings"]):
        _fail("warnings", "expected a list of strings")
    if not isinstance(obj["sanity"], list) or not all(isinstance(s, dict) and "message" in s for s in obj["sanity"]):
        _fail("sanity", "expected a list of objects with a 'message'")
    return obj


def load_results(path: str | Path) -> dict:
    """Read and validate a results.json, or the one inside a results folder."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise DataError(f"no results file at {path} (expected a results.json or a folder holding one)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    try:
        return validate_results(obj)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


# ----------------------------------------------------------------------------- merging
def merge_results(paths: Iterable[str | Path | dict]) -> dict:
    """Merge several results files (or folders, or already-loaded dicts) into one.

    Rows are unioned. The same row and dataset in two inputs: the later input wins, and a warning
    records what was replaced. Warnings of all inputs are kept; sanity checks are recomputed on
    the merged rows; averages are recomputed from the merged datasets.
    """
    merged: dict = {
        "schema": SCHEMA_VERSION, "models": {}, "attack": {}, "created": now_iso(), "warnings": [], "sanity": []
    }
    sources = []
    for item in paths:
        obj = validate_results(item) if isinstance(item, dict) else load_results(item)
        source = "<dict>" if isinstance(item, dict) else str(item)
        sources.append(source)
        if merged["attack"] and obj["attack"] and _attack_core(obj["attack"]) != _attack_core(merged["attack"]):
            merged["warnings"].append(
                f"merge: {source} used another attack ({_attack_core(obj['attack'])}); each row keeps its own 'attack'"
            )
        merged["attack"] = merged["attack"] or dict(obj["attack"])
        for w in obj["warnings"]:
            if w not in merged["warnings"]:
                merged["warnings"].append(w)
        for row, entry in obj["models"].items():
            _merge_row(merged, row, entry, obj["attack"], source)
    eps = set()
    for entry in merged["models"].values():
        entry["average"] = zeroshot_average(entry["datasets"])
        for ds in entry["datasets"].values():
            eps.update(ds["robust"])
    if merged["attack"]:
        merged["attack"]["eps"] = sorted_eps(eps)
    merged["sources"] = sources
    merged["sanity"] = sanity_checks(merged)
    return merged


def _attack_core(attack: dict) -> dict:
    return {k: attack.get(k) for k in ("name", "iterations", "norm", "n_target_classes", "restarts", "version")}


def same_weights(stored: str | None, now: str | None) -> bool:
    """Whether two rows' ``weights`` name the same model: the same tag, id or path, or two
    spellings of one local file (relative and absolute, from another working folder, through a
    link). Whether that file changed since is the ``weights_file`` stamp's question."""
    if stored == now:
        return True
    if not (isinstance(stored, str) and isinstance(now, str)):  # None, or a record edited by hand
        return False
    try:
        return os.path.samefile(stored, now)
    except (OSError, ValueError):  # a tag or hub id, a file gone, a path with a NUL
        return False


def same_evaluation(old: dict, new: dict) -> bool:
    """Whether two rows of results come from the same model and attack (radii aside: adding an eps
    to a row is a legitimate extension), so that their datasets may share one row."""
    def core(row: dict) -> tuple:
        attack = {k: v for k, v in row.get("attack", {}).items() if k != "eps"}
        return row.get("arch"), row.get("forward", 1), json.dumps(attack, sort_keys=True)
    same_file = "weights_file" not in old or old["weights_file"] == new.get("weights_file")
    return core(old) == core(new) and same_weights(old.get("weights"), new.get("weights")) and same_file


def _merge_row(merged: dict, row: str, entry: dict, attack: dict, source: str) -> None:
    incoming = {k: v for k, v in entry.items() if k not in ("datasets", "average")}
    incoming.setdefault("attack", dict(attack))
    target = merged["models"].get(row)
    if target is not None and not same_evaluation(target, incoming):
        merged["warnings"].append(
            f"merge: row {row!r} in {source} is {incoming['arch']} / {incoming['weights']} attacked with "
            f"{_attack_core(incoming['attack'])} (model forward {incoming.get('forward', 1)}), another model, "
            f"attack or mmtard model forward than before; its earlier results on "
            f"{', '.join(sorted(target['datasets'])) or 'no dataset'} are dropped, not mixed in")
        target = None
    if target is None:
        target = {**incoming, "datasets": {}}
        merged["models"][row] = target
    for name, ds in entry["datasets"].items():
        if name in target["datasets"]:
            merged["warnings"].append(f"merge: {row}/{name} appears twice; the later file ({source}) wins")
        target["datasets"][name] = dict(ds)


# ----------------------------------------------------------------------------- sanity checks
def is_undefended(row: str, entry: dict) -> bool:
    return bool(entry.get("undefended")) or row in UNDEFENDED_NAMES


def sanity_checks(results: dict, undefended_max: float = UNDEFENDED_MAX_ROBUST) -> list[dict]:
    """The checks every evaluation should pass; returns the failures (an empty list is good news).

    - robust accuracy never above clean accuracy;
    - robust accuracy non-increasing in eps (a larger ball contains the smaller one, so a rise
      means the attack is too weak or randomised);
    - an undefended model (row ``undefended`` or flagged ``"undefended": true``) at the largest
      eps near zero; more than ``undefended_max`` percent suggests gradient masking.
    """
    out = []
    for row, entry in results["models"].items():
        for name, ds in entry["datasets"].items():
            keys = sorted_eps(ds["robust"])
            for key in keys:
                if ds["robust"][key] > ds["clean"] + 1e-9:
                    out.append(_flag("robust<=clean", row, name, key,
                                     f"{row}/{name}: robust {ds['robust'][key]:.2f} at {key} is above "
                                     f"clean {ds['clean']:.2f}"))
            for small, large in zip(keys, keys[1:]):
                if ds["robust"][large] > ds["robust"][small] + 1e-9:
                    out.append(_flag("monotone-eps", row, name, large,
                                     f"{row}/{name}: robust accuracy rises from {ds['robust'][small]:.2f} at {small} "
                                     f"to {ds['robust'][large]:.2f} at {large}; the attack may be too weak"))
            if is_undefended(row, entry) and keys and ds["robust"][keys[-1]] > undefended_max:
                out.append(_flag("undefended-near-zero", row, name, keys[-1],
                                 f"{row}/{name}: undefended model keeps {ds['robust'][keys[-1]]:.2f}% robust accuracy "
                                 f"at {keys[-1]} (expected <= {undefended_max:g}%); check for gradient masking"))
    return out


def _flag(check: str, row: str, dataset: str, eps: str | None, message: str) -> dict:
    return {"check": check, "row": row, "dataset": dataset, "eps": eps, "message": message}

"""Clean and adversarial zero-shot accuracy of CLIP models over datasets and radii -> results.json.

The protocol of METHOD.md §8: each model is a :class:`~mmtard.models.CLIPClassifier` with its own
logit scale (``scale=None``) and its own text embeddings of the dataset's class names and
templates; sets of one image size enter at native resolution and the classifier's resize counts
as part of the model, so eps is in the dataset's pixel space (sets of mixed sizes are resized to
the model's input size first, see :mod:`mmtard.eval_sets` and ``mmtard eval``). Robust accuracy
comes from AutoAttack (:mod:`mmtard.autoattack`); clean-misclassified samples count as non-robust
and are not attacked.

Resumable and mergeable: per-sample verdicts live in ``out_dir/samples/<row>/<dataset>.json`` and
are rewritten atomically after every batch and eps, so an evaluation killed midway recomputes only
what is missing. Batches are fixed slices of the seeded subsample and each attack call has its own
seed, so on a CPU a resumed run gives exactly the numbers of an uninterrupted one. On a GPU some
kernels are not deterministic (the input gradient of a bicubic resize sums with atomics), so a
resumed run matches an uninterrupted one as closely as two uninterrupted runs match each other.
A record another run is completing is refused (a lock beside it); a set whose labels changed
under the same sample ids is refused too.

Under torchrun the missing batches are dealt round-robin to the ranks; after each round of
``world_size`` batches the verdicts are gathered and rank 0 alone writes the record (and, at the
end, results.json). Since a batch's verdicts do not depend on which process computes them, a
distributed evaluation gives the single-process numbers (exactly, where the kernels are
deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmtard.attacks import format_eps, parse_eps
from mmtard.autoattack import AttackSpec, robust_flags, strict_fp32
from mmtard.checkpoint import exclusive_lock, lock_without_waiting, unused_name
from mmtard.dataset_digest import dataset_digest, same_data
from mmtard.distributed import all_gather_object, current_env, run_on_main
from mmtard.errors import ConfigError, DataError, MmtardError
from mmtard.eval_sets import DatasetEntry
from mmtard.results import (
    MODEL_FORWARD,
    RESULTS_NAME,
    SCHEMA_VERSION,
    load_results,
    now_iso,
    same_evaluation,
    same_weights,
    sanity_checks,
    sorted_eps,
    validate_results,
    write_json_atomic,
    zeroshot_average,
)

log = logging.getLogger(__name__)

BatchHook = Callable[[str, str, int], None]


@dataclass(frozen=True)
class ModelEntry:
    """A row of the results table: an open_clip architecture and its weights.

    Attributes:
        row: the row name in results.json and the report (``undefended`` flags itself).
        arch: open_clip model name, e.g. ``ViT-B-32`` or ``mmtard-tiny-vit``.
        weights: open_clip pretrained tag, local weights file, or None (random weights).
        undefended: marks a model with no adversarial training, whose robust accuracy at the
            largest eps should be near zero (a sanity check).
    """

    row: str
    arch: str
    weights: str | None = None
    undefended: bool = False


# ----------------------------------------------------------------------------- per-sample store
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _file_stamp(weights: str | None) -> dict | None:
    """Size and modification time of a local weights file: a checkpoint rewritten in place must
    not be mistaken for the one already evaluated."""
    if not weights or not Path(weights).is_file():
        return None
    stat = Path(weights).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sample_path(out_dir: Path, row: str, dataset: str) -> Path:
    return out_dir / "samples" / row / f"{dataset}.json"


def _new_record(
    model: ModelEntry, entry: DatasetEntry, spec: AttackSpec, n_samples: int | None, seed: int, batch_size: int
) -> dict:
    from mmtard.data import subsample_indices

    ds = entry.dataset
    if len(ds) == 0:  # would be reported as 0 % clean and pull every average down
        raise DataError(f"dataset {entry.name!r} has no samples to evaluate")
    indices = subsample_indices(len(ds), len(ds) if n_samples is None else n_samples, seed)
    ids = getattr(ds, "sample_ids", None)
    return {
        "row": model.row, "arch": model.arch, "weights": model.weights, "undefended": model.undefended,
        "weights_file": _file_stamp(model.weights), "forward": MODEL_FORWARD,
        "dataset": entry.name, "kind": entry.kind, "n_total": len(ds), "n_classes": len(entry.classnames),
        "seed": seed, "batch_size": batch_size, "attack": spec.describe(),
        "head": _digest([entry.classnames, entry.templates]),
        "image_size": getattr(ds, "image_size", None),
        "indices": indices,
        "sample_ids": [str(ids[i]) for i in indices] if ids is not None else [str(i) for i in indices],
        "labels": [None] * len(indices), "clean": [None] * len(indices), "robust": {}, "messages": [],
    }


def _hold_record(path: Path) -> IO[str]:
    """An exclusive hold on the record at ``path`` (a lock on ``.<name>.lock`` beside it), or a
    refusal when another evaluation holds it: two runs completing one record would each rewrite it
    whole from their own copy, and one's finished work would be lost. Runs evaluating other rows or
    sets into the same folder go on side by side. Released when the handle is closed or the process
    dies."""
    handle = lock_without_waiting(path.with_name(f".{path.name}.lock"), "a second evaluation of this record")
    if handle is None:
        raise MmtardError(f"{path} is being evaluated by another mmtard eval run; wait for it to end, or "
                          "evaluate into another --out")
    return handle


def _open_record(path: Path, fresh: dict, data_digest: Callable[[str], str | None] | None = None) -> dict:
    """The stored record if it describes the same evaluation, else the fresh one; a stored record
    of a *different* evaluation is refused rather than silently mixed or overwritten.
    ``data_digest(kind)`` digests the evaluated files (:mod:`mmtard.dataset_digest`); a fresh
    record keeps both kinds."""
    data_digest = data_digest or (lambda kind: None)

    def new_record() -> dict:
        files = data_digest("files")
        return {**fresh, "data": None if files is None else {"files": files, "bytes": data_digest("bytes")}}

    if not path.is_file():
        return new_record()
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not _whole_record(old):  # a record only saves work: a damaged one is done again
        log.warning("%s is unreadable or incomplete; starting it again", path)
        return new_record()
    # sample_ids: the same positions may now hold other images; image_size: eps would be measured
    # in another pixel space. Records older than the forward field (and so older than image sizes,
    # which earlier versions did not record) are refused on "forward" before image_size is reached.
    old = {"forward": 1, **old}
    for key in ("arch", "weights", "weights_file", "forward", "indices", "sample_ids", "attack", "head", "seed",
                "image_size"):
        if key == "weights" and same_weights(old.get(key), fresh[key]):
            continue
        if old.get(key) != fresh[key]:
            hint = {"indices": " (--n-samples / --imagenet-samples or --seed changed?)",
                    "image_size": " (mmtard eval now resizes ImageNet and the suite's sets of varied image sizes "
                                  "to each model's own input size; earlier versions resized them to 224)",
                    "forward": " (written by an older mmtard, before QuickGELU for OpenAI-derived weights "
                               "and the release's bicubic resize)"}.get(key, "")
            stored, now = old.get(key), fresh[key]
            if isinstance(stored, dict) and isinstance(now, dict):  # name the attack settings that differ
                changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
                stored, now = ({k: d.get(k) for k in changed} for d in (stored, now))
            raise ConfigError(
                f"{path} was written by a different evaluation ({key} differs: stored "
                f"{str(stored)[:80]!r}, now {str(now)[:80]!r}){hint}. Use another --out (out_dir), "
                "or delete that file to recompute it."
            )
    if not same_data(old.get("data"), data_digest):  # None: written before digests, nothing to compare
        raise ConfigError(f"{path} was written on other images or labels under the same names (data differs: the "
                          "dataset was regenerated or its files replaced since). Use another --out (out_dir), or "
                          "delete that file to recompute it.")
    if old.get("batch_size") != fresh["batch_size"]:
        # Batches are part of what makes a resumed run exact (AutoAttack draws its random starts
        # per batch), so the stored batching wins over the one asked for now.
        log.info("%s: resuming with its stored batch_size %s", path, old.get("batch_size"))
    return old


def _whole_record(record: Any) -> bool:
    """Whether a stored record has every per-sample list at full length (one edited by hand or
    cut short would otherwise count its missing samples as done)."""
    if not isinstance(record, dict) or not isinstance(record.get("indices"), list):
        return False
    if not isinstance(record.get("batch_size"), int) or record["batch_size"] < 1:
        return False
    n = len(record["indices"])
    lists = [record.get(k) for k in ("sample_ids", "labels", "clean")]
    robust = record.get("robust")
    if not isinstance(robust, dict):
        return False
    return all(isinstance(v, list) and len(v) == n for v in lists + list(robust.values()))


def _missing_chunks(record: dict, eps_keys: list[str]) -> list[int]:
    bs, n = record["batch_size"], len(record["indices"])
    out = []
    for c, start in enumerate(range(0, n, bs)):
        sl = slice(start, min(start + bs, n))
        if any(v is None for v in record["clean"][sl]) or any(
            any(v is None for v in record["robust"].get(e, [None] * n)[sl]) for e in eps_keys
        ):
            out.append(c)
    return out


def _attack_seed(seed: int, dataset: str, chunk: int, eps_key: str) -> int:
    return zlib.crc32(f"{seed}:{dataset}:{chunk}:{eps_key}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- the loop
def _load_classifier(model: ModelEntry, device: str, cache: dict):
    from mmtard.models import CLIPClassifier, ModelSpec, create_clip, freeze

    if model.row not in cache:
        cache.clear()  # one model in memory at a time
        with torch.random.fork_rng(devices=[]):  # a random-weights row is the same model on every rank
            torch.manual_seed(0)
            clip = freeze(create_clip(ModelSpec(model.arch, model.weights), device)).float()
        cache[model.row] = CLIPClassifier(clip, scale=None).to(device).eval()
    return cache[model.row]


def _check_head(entry: DatasetEntry) -> None:
    ds_names = getattr(entry.dataset, "classnames", None)
    if ds_names is not None and len(ds_names) != len(entry.classnames):
        raise DataError(
            f"dataset {entry.name!r}: the zero-shot head has {len(entry.classnames)} class names but the "
            f"dataset's labels cover {len(ds_names)} classes"
        )


def _collate(entry: DatasetEntry):
    def collate(batch):
        try:
            return torch.utils.data.default_collate(batch)
        except RuntimeError as exc:
            raise DataError(
                f"dataset {entry.name!r}: images of one batch differ in size ({exc}); build the dataset "
                "with an image_size so that every image is resized and centre-cropped"
            ) from exc
    return collate


def _evaluate_one(
    classifier, model: ModelEntry, entry: DatasetEntry, record: dict, path: Path, eps: dict[str, float],
    spec: AttackSpec, device: str, num_workers: int, progress: bool, on_batch: BatchHook | None,
) -> None:
    """Fill in the missing per-sample verdicts of one (model, dataset), saving after each step."""
    n, bs = len(record["indices"]), record["batch_size"]
    for key in eps:
        record["robust"].setdefault(key, [None] * n)
    chunks = _missing_chunks(record, list(eps))
    if not chunks:
        return
    if current_env().enabled:
        _evaluate_sharded(classifier, model, entry, record, path, chunks, eps, spec, device, num_workers, progress,
                          on_batch)
        return
    batches = [record["indices"][c * bs:(c + 1) * bs] for c in chunks]
    loader = DataLoader(entry.dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate(entry))
    bar = tqdm(total=n, initial=n - sum(len(b) for b in batches), desc=f"{model.row} {entry.name} {spec.name}",
               unit="img", disable=not progress, leave=False)
    for c, (x, y, _) in zip(chunks, loader):
        def saved(key: str, c: int = c) -> None:
            write_json_atomic(record, path)
            if on_batch is not None:
                on_batch(entry.name, key, c)

        _evaluate_chunk(classifier, model, entry, record, c, x, y, eps, spec, device, saved)
        _note(record, _skipped(entry))
        write_json_atomic(record, path)
        bar.update(len(y))
    bar.close()


def _evaluate_chunk(
    classifier, model: ModelEntry, entry: DatasetEntry, record: dict, c: int, x: torch.Tensor, y: torch.Tensor,
    eps: dict[str, float], spec: AttackSpec, device: str, after_eps: Callable[[str], None],
) -> None:
    """The clean and robust verdicts of batch ``c`` into ``record``; ``after_eps(key)`` after each radius."""
    n_classes, bs = len(entry.classnames), record["batch_size"]
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.numel():
        raise DataError(f"dataset {entry.name!r}: label {int(bad[0])} outside the head's {n_classes} classes "
                        f"(0..{n_classes - 1})")
    sl = slice(c * bs, c * bs + len(y))
    x, y = x.to(device).float(), y.to(device)
    stored = record["clean"][sl]
    labels = record["labels"][sl]
    if all(v is not None for v in labels) and labels != y.tolist():
        # same sample ids, other labels: another dataset under the same names (a set without a
        # file digest, e.g. CIFAR's few binary files); its stored verdicts are of other images
        raise DataError(f"dataset {entry.name!r}: batch {c} has other labels than the stored record's; the set "
                        f"changed since it was evaluated. Delete samples/{model.row}/{entry.name}.json in the "
                        "output folder, or evaluate into another --out")
    if all(v is not None for v in stored):  # keep the verdicts the stored attacks were run on
        correct = torch.tensor(stored, dtype=torch.bool, device=y.device)
    else:  # in the precision the attacks run in (robust_flags), so they start from these verdicts
        with torch.no_grad(), strict_fp32():
            correct = classifier(x).argmax(1).eq(y)
    record["labels"][sl] = y.tolist()
    record["clean"][sl] = correct.tolist()
    for key, value in eps.items():
        if all(v is not None for v in record["robust"][key][sl]):
            continue
        robust = torch.zeros_like(correct)
        if value == 0:  # nothing to perturb: robust is clean-correct (a second pass could flip near-ties)
            robust = correct.clone()
        elif correct.any():
            attack_seed = _attack_seed(record["seed"], entry.name, c, key)
            outcome = robust_flags(classifier, x[correct], y[correct], value, spec, attack_seed)
            robust[correct] = outcome.robust.to(robust.device)
            _note(record, [f"{model.row}/{entry.name}: {m}" for m in outcome.messages])
        record["robust"][key][sl] = robust.tolist()
        after_eps(key)


def _evaluate_sharded(
    classifier, model: ModelEntry, entry: DatasetEntry, record: dict, path: Path, chunks: list[int],
    eps: dict[str, float], spec: AttackSpec, device: str, num_workers: int, progress: bool,
    on_batch: BatchHook | None,
) -> None:
    """The loop under torchrun: in each round of ``world_size`` missing batches rank r attacks the
    r-th; the verdicts are gathered on every rank and rank 0 saves the record, so an interrupted
    run redoes at most one round."""
    env = current_env()
    n, bs = len(record["indices"]), record["batch_size"]
    mine = [record["indices"][c * bs:(c + 1) * bs] for c in chunks[env.rank::env.world_size]]
    loader = iter(DataLoader(entry.dataset, batch_sampler=mine, num_workers=num_workers,
                             collate_fn=_collate(entry))) if mine else iter(())
    bar = tqdm(total=n, initial=n - sum(min(bs, n - c * bs) for c in chunks), unit="img", leave=False,
               desc=f"{model.row} {entry.name} {spec.name} x{env.world_size}", disable=not (progress and env.is_main))
    for start in range(0, len(chunks), env.world_size):
        todo = {c: [k for k in eps if any(v is None for v in record["robust"][k][c * bs:(c + 1) * bs])]
                for c in chunks[start:start + env.world_size]}
        patch = None
        if start + env.rank < len(chunks):
            c = chunks[start + env.rank]
            try:
                x, y, _ = next(loader)
                _evaluate_chunk(classifier, model, entry, record, c, x, y, eps, spec, device, lambda key: None)
            except Exception as exc:  # every rank must learn of it, or they wait in the gather below
                patch = {"error": exc if isinstance(exc, MmtardError) else MmtardError(f"rank {env.rank}: {exc!r}")}
            else:
                sl = slice(c * bs, c * bs + len(y))
                patch = {"chunk": c, "labels": record["labels"][sl], "clean": record["clean"][sl],
                         "robust": {k: record["robust"][k][sl] for k in eps},
                         "messages": record["messages"] + _skipped(entry)}
        patches = [p for p in all_gather_object(patch) if p is not None]
        for p in patches:
            if "error" in p:
                raise p["error"]
        for p in patches:
            sl = slice(p["chunk"] * bs, p["chunk"] * bs + len(p["labels"]))
            record["labels"][sl], record["clean"][sl] = p["labels"], p["clean"]
            for key, flags in p["robust"].items():
                record["robust"][key][sl] = flags
            new = [m for m in p["messages"] if m not in record["messages"]]
            if env.is_main:
                _note(record, new)
            else:
                record["messages"].extend(new)
            bar.update(len(p["labels"]))
        run_on_main(write_json_atomic, record, path)  # a refusal there (a full disk) stops every rank
        if env.is_main:
            for c, keys in todo.items() if on_batch is not None else ():
                for key in keys:
                    on_batch(entry.name, key, c)
    bar.close()


def _note(record: dict, messages: list[str]) -> None:
    for m in messages:
        if m not in record["messages"]:
            log.warning("%s", m)
            record["messages"].append(m)


def _skipped(entry: DatasetEntry) -> list[str]:
    pop = getattr(entry.dataset, "pop_skipped", None)
    if pop is None:
        return []
    count, where = pop()
    if not count:
        return []
    return [f"{entry.name}: {count} unreadable files replaced by the next readable one (first: {where[0]})"]


def summarize(record: dict) -> dict:
    """The results.json entry of one (row, dataset) from its per-sample record: every eps whose
    verdicts are complete (including radii of earlier runs into the same folder)."""
    clean = [v for v in record["clean"] if v is not None]
    out = {"n": len(clean), "clean": 100.0 * sum(clean) / max(len(clean), 1), "robust": {},
           "kind": record["kind"], "n_classes": record["n_classes"], "n_total": record["n_total"],
           "image_size": record.get("image_size")}
    for key in sorted_eps(record["robust"]):
        flags = record["robust"][key]
        if flags and all(v is not None for v in flags):
            out["robust"][key] = 100.0 * sum(flags) / len(flags)
    return out


def run_eval(
    models: Sequence[ModelEntry],
    datasets: Sequence[DatasetEntry],
    eps_list: Sequence[str | float],
    attack: AttackSpec | str = "apgd",
    n_samples: int | None | Mapping[str, int | None] = 1000,
    batch_size: int = 100,
    out_dir: str | Path = "eval",
    seed: int = 0,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    on_batch: BatchHook | None = None,
) -> dict:
    """Evaluate every model on every dataset at every eps; write and return results.json.

    Args:
        models: rows of the table.
        datasets: evaluation sets (see :func:`world_datasets`, :func:`imagenet_dataset`,
            :func:`suite_datasets`).
        eps_list: radii as ``"2/255"`` strings or numbers in [0, 1].
        attack: an :class:`AttackSpec` or its name (``apgd``, ``standard``, ``pgd``).
        n_samples: seeded subsample size per dataset (None: all samples), or a mapping from
            dataset name to size, where absent names take all samples. The paper's protocol is
            ``{"imagenet": None}`` (its list already holds the 5 000 images) and 1 000 elsewhere.
        batch_size: images per attack batch. A resumed (row, dataset) keeps the batch size it
            was started with, so its numbers match an uninterrupted run exactly.
        out_dir: where ``samples/``, ``text_cache/`` and ``results.json`` go.
        seed: seeds the subsample and every attack call.
        device: torch device.
        num_workers: DataLoader workers.
        progress: show tqdm bars.
        on_batch: called as ``on_batch(dataset, eps_key, chunk)`` after each saved step.

    Returns:
        The results dict (also written to ``out_dir/results.json``), merged over any results
        already in ``out_dir`` from earlier runs; this run's rows win.
    """
    spec = AttackSpec(name=attack) if isinstance(attack, str) else attack
    eps = {format_eps(v): v for v in (parse_eps(e) for e in eps_list)}
    if not eps:
        raise ConfigError("eval.eps: give at least one radius, e.g. 1/255")
    if not models or not datasets:
        raise ConfigError("run_eval needs at least one model and one dataset")
    sizes = n_samples if isinstance(n_samples, Mapping) else {e.name: n_samples for e in datasets}
    if batch_size < 1 or any(n is not None and n < 1 for n in sizes.values()):
        raise ConfigError("eval: batch_size and n_samples must be >= 1")
    out_dir = Path(out_dir)
    for entry in datasets:
        _check_head(entry)
    from mmtard.models import ModelSpec, check_model_source

    for model in models:  # every row's weights before the first attack: not hours into the table
        check_model_source(ModelSpec(model.arch, model.weights))
    rows, cache, digests = {}, {}, {}
    warnings_seen: list[str] = []
    for model in models:
        row = {"arch": model.arch, "weights": model.weights, "weights_file": _file_stamp(model.weights),
               "forward": MODEL_FORWARD, "undefended": model.undefended,
               "attack": spec.describe(list(eps.values())), "datasets": {}}
        for entry in datasets:
            path = _sample_path(out_dir, model.row, entry.name)
            fresh = _new_record(model, entry, spec, sizes.get(entry.name), seed, batch_size)

            def data_digest(kind: str, entry: DatasetEntry = entry, indices: list = fresh["indices"]) -> str | None:
                if (entry.name, kind) not in digests:  # the same images for every model: once per run
                    digests[entry.name, kind] = dataset_digest(entry.dataset, indices, kind)
                return digests[entry.name, kind]

            held: list = []  # rank 0's hold on the record while this run reads and completes it
            run_on_main(lambda: held.append(_hold_record(path)))
            try:
                # under torchrun, rank 0 reads (and digests) and shares it
                record = run_on_main(_open_record, path, fresh, data_digest)
                if _missing_chunks(record, list(eps)):
                    classifier = _load_classifier(model, device, cache)
                    classifier.set_text_weights(_head(classifier, model, entry, out_dir))
                    _evaluate_one(classifier, model, entry, record, path, eps, spec, device, num_workers, progress,
                                  on_batch)
            finally:
                for handle in held:
                    handle.close()  # closing drops the lock
            row["datasets"][entry.name] = summarize(record)
            warnings_seen += [m for m in record["messages"] if m not in warnings_seen]
        row["average"] = zeroshot_average(row["datasets"])
        rows[model.row] = row
    return run_on_main(_write_results, out_dir, rows, spec, list(eps.values()), warnings_seen)


def _head(classifier, model: ModelEntry, entry: DatasetEntry, out_dir: Path) -> torch.Tensor:
    from mmtard.zeroshot import fingerprint_text_tower, text_weights

    cache_dir = out_dir / "text_cache" if current_env().is_main else None  # only rank 0 writes
    if cache_dir is not None and getattr(classifier, "text_fingerprint", None) is None:
        # the frozen tower is hashed once per loaded model, not once per dataset
        classifier.text_fingerprint = fingerprint_text_tower(classifier.clip)
    return text_weights(classifier.clip, model.arch, entry.classnames, entry.templates, cache_dir=cache_dir,
                        fingerprint=getattr(classifier, "text_fingerprint", None))


def _write_results(out_dir: Path, rows: dict, spec: AttackSpec, eps: list[float], warnings_seen: list[str]) -> dict:
    """Merge this run's rows into ``results.json``; under a lock, so that evaluations of other
    models into the same folder at the same time each keep their rows."""
    path = out_dir / RESULTS_NAME
    with exclusive_lock(out_dir / f".{RESULTS_NAME}.lock"):
        return _write_results_locked(path, rows, spec, eps, warnings_seen)


def _write_results_locked(path: Path, rows: dict, spec: AttackSpec, eps: list[float],
                          warnings_seen: list[str]) -> dict:
    if path.is_file():  # rows and datasets evaluated earlier into the same folder stay; this run's win
        try:
            old = load_results(path)
        except DataError as exc:  # its rows are not lost: kept aside, and the new file says where
            aside = unused_name(path.with_name(f"{path.name}.unreadable"))
            os.replace(path, aside)
            warnings_seen.append(f"the earlier {path.name} could not be read ({exc}); it was moved to {aside.name} "
                                 "and its rows are not in this file")
            log.warning("%s", warnings_seen[-1])
        else:
            for row, entry in old["models"].items():
                if row not in rows:
                    rows[row] = entry
                elif same_evaluation(entry, rows[row]):
                    rows[row]["datasets"] = {**entry["datasets"], **rows[row]["datasets"]}
                    rows[row]["average"] = zeroshot_average(rows[row]["datasets"])
                else:
                    dropped = sorted(set(entry["datasets"]) - set(rows[row]["datasets"]))
                    if dropped:
                        warnings_seen.append(
                            f"row {row}: evaluated again with other weights or another attack; its earlier "
                            f"results on {', '.join(dropped)} were dropped, not mixed in")
            warnings_seen = [w for w in old["warnings"] if w not in warnings_seen] + warnings_seen
    all_eps = {k for r in rows.values() for d in r["datasets"].values() for k in d["robust"]}
    attack = spec.describe(eps)
    attack["eps"] = sorted_eps(all_eps | set(attack["eps"]))
    results = {"schema": SCHEMA_VERSION, "models": rows, "attack": attack, "created": now_iso(),
               "warnings": list(warnings_seen), "sanity": []}
    results["sanity"] = sanity_checks(results)
    for flag in results["sanity"]:
        log.warning("sanity: %s", flag["message"])
    write_json_atomic(validate_results(results), path)
    return results

"""Loading CLIP models through open_clip and wrapping them as [0, 1]-image classifiers.

Every model the attacks, losses and evaluation see is a :class:`CLIPClassifier`: it takes float
images in [0, 1] at any size, resizes them to its own input size, applies its own mean/std and
returns zero-shot logits against class text embeddings. Keeping normalisation inside the module is
what lets the attack work in pixel space, so eps is in pixel units for every model alike
(METHOD.md §1), and lets teachers and student have different input sizes and statistics.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.checkpoint import durable_replace, first_line, unpickling_reason
from mmtard.errors import ModelError

log = logging.getLogger(__name__)

TINY_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = ("mmtard-tiny-vit", "mmtard-small-vit")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_registered = False


def register_tiny_models() -> None:
    """Register the packaged tiny architectures with open_clip's own config registry (once)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(TINY_MODEL_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model: an open_clip architecture and where its weights come from.

    ``pretrained`` is ``None`` (random weights), an open_clip tag such as ``openai``, or a local
    ``.pt``/``.pth``/``.bin``/``.safetensors`` file. ``name`` may be an ``hf-hub:org/repo`` id, in
    which case ``pretrained`` must be empty.
    """

    name: str
    pretrained: str | None = None


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether a download could possibly work; answers at once on an offline machine."""
    from huggingface_hub import constants as hub_constants

    # HF_HUB_OFFLINE with huggingface_hub's own true values, read now (the hub reads it at import)
    true_values = getattr(hub_constants, "ENV_VARS_TRUE_VALUES", {"1", "ON", "YES", "TRUE"})
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in true_values:
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_cache_only(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only, so an offline miss fails fast
    instead of retrying for a minute."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _not_random_init_notice(record: logging.LogRecord) -> bool:
    return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _weights_loaded_after() -> Iterator[None]:
    """Silence open_clip's "Model initialized randomly" warning for a model whose weights mmtard
    loads from a file right after building it: the warning made every teacher given as a file
    look random in the logs (open_clip logs it on the root logger)."""
    root = logging.getLogger()
    root.addFilter(_not_random_init_notice)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init_notice)


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ModelError(f"unknown open_clip model '{name}'.{hint} `open_clip.list_models()` lists all.")


def _is_weight_file(pretrained: str) -> bool:
    return pretrained.endswith(WEIGHT_SUFFIXES) or os.path.sep in pretrained or Path(pretrained).is_file()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only torch file; never unpickle code.

    A file that needs arbitrary unpickling is refused: it could run code on load.
    """
    state = read_weights_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return strip_module_prefix(state)


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from a DDP-wrapped model, without its ``module.`` prefix."""
    if state and next(iter(state)).startswith("module."):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def weights_format(path: str | Path) -> str:
    """``safetensors`` or ``torch``, from the file's first bytes; a missing file, or one in neither
    format, is refused by name. Cheap: a check of every weights file before long work starts."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weight file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle
        return "torch"
    raise ModelError(f"cannot read weight file {path}: it is neither a safetensors nor a torch file "
                     f"(it starts with {head!r})")


def check_model_source(spec: ModelSpec) -> None:
    """Refuse an unknown architecture, or a local weights file that is missing or in no weights
    format, without building the model (tags and hub ids are checked when loaded)."""
    register_tiny_models()
    _check_model_name(spec.name)
    if spec.pretrained and _is_weight_file(str(spec.pretrained)):
        weights_format(spec.pretrained)


def read_weights_file(path: str | Path) -> object:
    """What a safetensors or weights-only torch file holds (a dict of tensors, or a checkpoint
    dict that wraps one), read without ever unpickling code. The format is told by the file's
    first bytes, not its name: a safetensors file saved as ``.pt`` loads, and a file that is
    neither (a text or HTML page saved under a weights name) is named as such."""
    path = Path(path)
    if weights_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"refusing to load {path}: it needs arbitrary unpickling, which can execute code "
            "(torch.load weights_only=True rejected it). If you trust the file, convert it once "
            "with `torch.load(path, weights_only=False)` and save its state_dict with "
            f"safetensors. Detail: {unpickling_reason(exc)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways (zip, EOF, KeyError)
        raise ModelError(f"cannot read weight file {path}: {type(exc).__name__}: {first_line(exc)}") from exc


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, mismatch: str) -> None:
    """Load a state dict strictly, naming the file, the first mismatched keys or shapes, and
    ``mismatch`` (what the file then is not, e.g. "does not match architecture 'ViT-B-32'")."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ModelError(
                f"{path} {mismatch}: tensor '{key}' has shape "
                f"{tuple(value.shape)} in the file but {tuple(own[key].shape)} in the model"
            )
    if missing or unexpected:
        raise ModelError(
            f"{path} {mismatch}: {len(missing)} missing keys "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]})"
        )
    module.load_state_dict(state, strict=True)


def create_clip(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """Build an open_clip CLIP from a name and a weights source, in eval mode.

    Local files are loaded here (safely) rather than by open_clip, so a wrong file gets an error
    that names both shapes. Tags and hf-hub ids go through open_clip's own pretrained machinery;
    offline, a tag that is not in the local cache fails at once with advice to pass a file.
    """
    register_tiny_models()
    name, pretrained = spec.name, (str(spec.pretrained) if spec.pretrained else None)
    _check_model_name(name)
    if pretrained and _is_weight_file(pretrained):
        metadata = _file_metadata(Path(pretrained))
        preprocess = _metadata_json(metadata, PREPROCESS_METADATA) or _architecture_preprocess(name)
        quick_gelu = _metadata_json(metadata, ACTIVATION_METADATA)
        if quick_gelu is None and PREPROCESS_METADATA in metadata:
            quick_gelu = False  # exported by mmtard before it recorded the activation: all GELU then
        with _weights_loaded_after():
            model = open_clip.create_model(name, pretrained=None, device="cpu", force_preprocess_cfg=preprocess,
                                           force_quick_gelu=bool(quick_gelu))
        _check_file_activation(model, quick_gelu, name, pretrained)
        load_state_checked(model, load_weights_file(pretrained), pretrained, f"does not match architecture '{name}'")
    elif pretrained or name.startswith(("hf-hub:", "local-dir:")):
        given, pretrained = pretrained, pretrained and clean_tag(pretrained)
        if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ModelError(
                f"'{given}' is neither a file nor a pretrained tag of '{name}' "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        offline = not name.startswith("local-dir:") and not _hub_reachable()
        try:
            with _hub_cache_only(offline):
                # require_pretrained: open_clip would otherwise only warn and return random weights
                # when a hub repository or a local folder holds a config but no weights
                model = open_clip.create_model(name, pretrained=pretrained, device="cpu", require_pretrained=True,
                                               force_quick_gelu=tag_uses_quick_gelu(name, pretrained))
        except Exception as exc:
            where = f"'{name}' with pretrained='{pretrained}'" if pretrained else f"'{name}'"
            if offline:
                raise ModelError(
                    f"cannot load {where}: the weights are not in the local cache and this machine "
                    "is offline. Download them elsewhere and pass a local .safetensors/.pt file as "
                    "`pretrained`."
                ) from exc
            raise ModelError(f"cannot load {where}: {exc}") from exc
    else:
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    return model.to(device).eval()


#: safetensors metadata keys under which :func:`export_open_clip` records the model's
#: normalisation (mean/std) and whether its MLPs use QuickGELU
PREPROCESS_METADATA = "mmtard.preprocess"
ACTIVATION_METADATA = "mmtard.quick_gelu"
_warned_architectures: set[str] = set()  # architectures whose tags' mean/std disagree, warned once
_warned_activation: set[str] = set()  # architectures whose files' activation was guessed, warned once


def _file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, whatever its name (empty for other formats and
    unreadable files)."""
    try:
        if weights_format(path) != "safetensors":
            return {}
    except ModelError:  # missing or in no format: the load itself names the file
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # a damaged file is reported by the load itself, naming it
        log.debug("no metadata in %s: %s", path, exc)
        return {}


def _metadata_json(metadata: dict[str, str], key: str):
    """One JSON value of a file's metadata; ``None`` when absent or unreadable."""
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except ValueError:
        log.debug("unreadable metadata %s: %r", key, metadata[key])
        return None


def clean_tag(tag: str) -> str:
    """A pretrained tag as open_clip spells it: ``OpenAI`` and ``laion2b-s34b-b79k`` name the tags
    ``openai`` and ``laion2b_s34b_b79k``."""
    return tag.lower().replace("-", "_")


def tag_uses_quick_gelu(name: str, tag: str | None) -> bool:
    """Whether open_clip's pretrained tag was trained with QuickGELU (all of OpenAI's CLIPs were).

    open_clip 3 builds a plain name such as ``ViT-B-32`` with ``nn.GELU`` whatever the tag and
    only warns, so OpenAI's weights would run with the wrong activation (the release, on open_clip
    2.19, got QuickGELU for ``openai``); the flag is therefore set from the tag's own config.
    """
    tag = tag and clean_tag(tag)
    if not tag or tag not in open_clip.list_pretrained_tags_by_model(name):
        return False
    return bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether a built open_clip model's MLPs use QuickGELU."""
    return any(isinstance(module, open_clip.model.QuickGELU) for module in clip.modules())


def _check_file_activation(model: nn.Module, recorded: bool | None, name: str, path: str) -> None:
    """A weights file recorded by :func:`export_open_clip` gets its own activation; any other file
    gets the architecture's, with a warning (once per architecture) where OpenAI's weights of that
    architecture used QuickGELU: a fine-tune of them (TeCoA, FARE, PMG-AFT checkpoints) needs
    ``NAME-quickgelu``, and nothing in a plain state dict says which it was."""
    if recorded is False and uses_quick_gelu(model):
        raise ModelError(f"{path} was exported from a model with GELU, but '{name}' builds QuickGELU; "
                         "use the architecture name without '-quickgelu'")
    if recorded is None and not uses_quick_gelu(model) and tag_uses_quick_gelu(name, "openai") \
            and name not in _warned_activation:
        _warned_activation.add(name)
        log.warning("%s: a weights file without mmtard's metadata is built with GELU, as '%s' says; OpenAI's "
                    "%s used QuickGELU, so if these weights descend from them name the architecture '%s-quickgelu'",
                    path, name, name, name)


def activation_guessed(spec: ModelSpec, clip: nn.Module) -> bool:
    """Whether ``clip``, built by :func:`create_clip` from ``spec``, got its activation from a guess:
    a weights file without mmtard's metadata, GELU by the architecture's name, although OpenAI's
    weights of that architecture used QuickGELU (the case :func:`_check_file_activation` warns of)."""
    pretrained = str(spec.pretrained) if spec.pretrained else None
    if not pretrained or not _is_weight_file(pretrained):
        return False
    metadata = _file_metadata(Path(pretrained))
    known = ACTIVATION_METADATA in metadata or PREPROCESS_METADATA in metadata
    return not known and not uses_quick_gelu(clip) and tag_uses_quick_gelu(spec.name, "openai")


def _architecture_preprocess(name: str) -> dict | None:
    """The mean/std every pretrained tag of ``name`` uses, when they agree (a SigLIP's 0.5, a
    CLIPA's ImageNet statistics). A weights file without mmtard's metadata says nothing of its
    normalisation, and open_clip alone would give it OpenAI's. When the tags disagree, OpenAI's
    (open_clip's default) stays, and the choice is logged once."""
    stats = set()
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if cfg.get("mean") and cfg.get("std"):
            stats.add((tuple(cfg["mean"]), tuple(cfg["std"])))
    if len(stats) == 1:
        mean, std = stats.pop()
        return {"mean": mean, "std": std}
    if len(stats) > 1 and name not in _warned_architectures:
        _warned_architectures.add(name)
        log.warning("%s: its pretrained tags normalise with different mean/std (%s); a weights file without "
                    "mmtard's metadata is normalised with open_clip's default, OpenAI's", name,
                    "; ".join(f"mean {m} std {s}" for m, s in sorted(stats)))
    return None


def input_size(name: str) -> int | None:
    """The square input size in pixels of the open_clip architecture ``name``, from its bundled
    config, without building it; None for a hub model (its config is remote), an unknown name or
    a non-square input."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return None
    register_tiny_models()
    size = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return size if isinstance(size, int) else None


def preprocess_stats(clip: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int]]:
    """Mean, std and (H, W) input size a CLIP expects, from open_clip's own preprocess config."""
    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    size = cfg.get("size", getattr(clip.visual, "image_size", 224))
    if isinstance(size, int):
        size = (size, size)
    return mean, std, (int(size[0]), int(size[1]))


class CLIPClassifier(nn.Module):
    """A CLIP seen as a zero-shot classifier of [0, 1] images (the contract of DESIGN.md).

    ``logits(x) = scale * normalize(f(x)) @ text_weights``. ``scale`` is fixed at 100 in all
    training losses (METHOD.md §1); evaluation passes ``scale=None`` to use the model's own
    learnt logit scale.
    """

    def __init__(self, clip: nn.Module, text_weights: torch.Tensor | None = None, scale: float | None = 100.0):
        super().__init__()
        self.clip = clip
        mean, std, size = preprocess_stats(clip)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_size = size
        self.scale = scale
        #: whether the image tower normalises its own input (:meth:`normalise_in_tower`)
        self.tower_normalises = False
        self.register_buffer("text_weights", torch.empty(0), persistent=False)
        if text_weights is not None:
            self.set_text_weights(text_weights)

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def num_classes(self) -> int:
        return self.text_weights.shape[1] if self.text_weights.numel() else 0

    def set_text_weights(self, text_weights: torch.Tensor) -> None:
        """Install a d x K matrix of normalised class embeddings."""
        self.text_weights = text_weights.to(device=self.mean.device, dtype=torch.float32)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to the model's input size and normalise (unless the tower does:
        :meth:`normalise_in_tower`); differentiable, so attacks pass through.

        Bicubic without antialiasing: the resize the release's CLIP_benchmark puts in front of
        CIFAR and STL-10 models (torchvision's ``Resize(BICUBIC, antialias=None)`` on a tensor)."""
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=False)
        return x if self.tower_normalises else self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The model's mean/std normalisation of [0, 1] images at its input size."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def normalise_in_tower(self) -> None:
        """Move the normalisation from :meth:`prepare` into the image tower's own call (a forward
        pre-hook on ``clip.visual``): the same operations on the same tensors, so the same
        features bit for bit, but a compiled tower (``train.compile``) now traces them and fuses
        them into its first kernel. Eager, they are two kernels over the fp32 image batch, plus one
        more for their input gradient in every PGD iteration (77 MB each at batch 128 and 224 px).
        Idempotent; :meth:`prepare` and the tower stay consistent because both follow
        :attr:`tower_normalises`."""
        if self.tower_normalises:
            return
        self.visual.register_forward_pre_hook(_TowerInputNormalisation(self))
        self.tower_normalises = True

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding (FARE matches these)."""
        return self.clip.encode_image(self.prepare(x))

    def image_embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(x).float(), dim=-1)

    def logit_scale(self) -> torch.Tensor | float:
        return self.scale if self.scale is not None else self.clip.logit_scale.exp().detach().float()

    def logits_from_embed(self, embed: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits in fp32, also under autocast: autocast would run the product in bf16,
        rounding logits of size ~30 (at scale 100) to a quarter, before any loss can upcast them.
        A [B, d] x [d, K] product: negligible next to the towers."""
        if not self.text_weights.numel():
            raise ModelError("this classifier has no class text embeddings yet (call set_text_weights)")
        with torch.autocast(embed.device.type, enabled=False):
            return self.logit_scale() * embed.float() @ self.text_weights

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embed(self.image_embed(x))

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """Logits by default; ``output="features"`` gives the unnormalised image features. One entry
        point for both, so a DDP wrapper around this module sees every trainable forward."""
        if output == "features":
            return self.image_features(x)
        return self.logits(x)


class _TowerInputNormalisation:
    """The forward pre-hook of :meth:`CLIPClassifier.normalise_in_tower`: normalises the tower's
    image argument with its classifier's mean/std (read at each call, so they follow ``.to()``)."""

    def __init__(self, classifier: CLIPClassifier):
        self.classifier = classifier

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        del module
        return (self.classifier.normalise(args[0]),) + tuple(args[1:])


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a model for good: no gradients, eval mode (teachers and reference models)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def train_only_image_tower(clip: nn.Module) -> None:
    """Only the student's image encoder trains; its text encoder and logit scale stay frozen."""
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    for parameter in clip.visual.parameters():
        parameter.requires_grad_(True)


def _umask() -> int:
    """The process's file-creation mask, read without changing it where Linux shows it (setting it
    to read it back would briefly give files other threads create at that moment the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_open_clip(clip: nn.Module, path: str | Path, record_activation: bool = True) -> Path:
    """Write a full CLIP as one safetensors file that
    ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads back unchanged (with
    ``force_quick_gelu=True`` for a QuickGELU model such as one started from OpenAI's weights;
    :func:`create_clip` reads that, and the normalisation, from the file's metadata).
    ``record_activation=False`` leaves the activation out of the metadata, for a model whose
    activation was only guessed (:func:`activation_guessed`): recorded, the guess would pass for
    knowledge and refuse the file under the other activation's name.

    Written atomically and durably (:func:`mmtard.checkpoint.durable_replace`): the file marks a
    finished run, so a crash must never leave a half (or, after a power cut, an empty) one.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in clip.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: two exports to one path do not collide
    mean, std, _ = preprocess_stats(clip)  # read back by create_clip: a SigLIP student stays a SigLIP
    metadata = {PREPROCESS_METADATA: json.dumps({"mean": mean, "std": std})}
    if record_activation:
        metadata[ACTIVATION_METADATA] = json.dumps(uses_quick_gelu(clip))
    if uses_quick_gelu(clip):
        log.info("%s uses QuickGELU: in plain open_clip, load it with force_quick_gelu=True (mmtard reads it from "
                 "the file)", path)
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600: other accounts could not read a student
        durable_replace(tmp, path)
    except Exception as exc:  # OSError (disk full) or safetensors' own error type
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write {path}: {exc}; the checkpoints are intact, run the same command again "
                         "once there is room") from exc
    return path

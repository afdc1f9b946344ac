"""The frozen cloud backbone: a timm ViT with its weights and preprocessing, frozen in one place.

Weights come from one of three sources:

* the model hub (timm's own ``pretrained=True`` path; fails offline with a clear message),
* a local file (``.safetensors``, ``.pth``/``.pt``/``.bin`` or ``.npz``), loaded through timm's own
  pretrained-file path so its checkpoint filters (position-embedding resize, key renames) apply,
* random init (for tests and cost figures).

Backbones that need more than a timm name (converted weights, say) register a factory with
:func:`register_backbone`; they are then usable wherever a timm name is.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mist_fed.assets.net import hub_reachable
from mist_fed.cloud.engine import openvino_trunk
from mist_fed.cloud.numerics import NUMERICS, RUNTIMES, autocast_dtype, features_id
from mist_fed.core.methods import starts_from_backbone
from mist_fed.core.specs import Geometry
from mist_fed.errors import BackboneError, WeightsUnavailableError
from mist_fed.registry import Registry

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild the same backbone: name, weight source, timm kwargs."""

    name: str
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights is not None and self.random_init:
            raise BackboneError("give either a weights file or random init, not both")


BackboneFactory = Callable[[BackboneSpec], "tuple[nn.Module, str]"]
_BACKBONES: Registry[BackboneFactory] = Registry("backbone", BackboneError)


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory ``spec -> (timm VisionTransformer, weights_id)`` under ``name``."""
    return _BACKBONES.register(name)


def _register_builtins() -> None:
    """Import the modules that register built-in backbones (idempotent)."""
    import mist_fed.cloud.onnx_vit  # noqa: F401  (registers dinov2_s14_imgfocus)


def registered_backbones() -> list[str]:
    _register_builtins()
    return _BACKBONES.names()


def file_digest(path: Path, length: int = 16) -> str:
    """Short sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


_OFFLINE_HINT = (
    "Pass --weights PATH to a local checkpoint, use an offline backbone "
    "(see `mist-fed inspect --help`: dinov2_s14_imgfocus), or --random-init for cost figures and tests."
)


def load_weights_file(model: Any, path: Path) -> None:
    """Load a local checkpoint into a timm ViT, strictly (the classifier head aside)."""
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; pass an existing {'/'.join(WEIGHT_SUFFIXES)} file"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsUnavailableError(
            f"weights file {path} has suffix {path.suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".npz":  # big_vision / augreg checkpoints
            model.load_pretrained(str(path))
            return
        state = timm.models.load_state_dict(str(path))
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:
        raise BackboneError(
            f"weights in {path} do not fit backbone {type(model).__name__}: {e}"
        ) from e
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise BackboneError(
            f"weights in {path} do not fit this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Check that the file holds this architecture's weights."
        )


def _create_timm(spec: BackboneSpec) -> tuple[nn.Module, str]:
    model: Any
    kwargs = {"num_classes": 0, **spec.model_kwargs}
    if spec.random_init:
        torch.manual_seed(spec.seed)
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
        extra = ",".join(f"{k}={v}" for k, v in sorted(spec.model_kwargs.items()))
        return model, f"random:{spec.name}:seed={spec.seed}:{extra}"
    if spec.weights is not None:
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
        path = Path(spec.weights).expanduser()
        load_weights_file(model, path)
        return model, f"file:{file_digest(path)}"
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"cannot fetch pretrained weights for {spec.name!r}: the model hub is not reachable "
            f"(offline, or MIST_FED_OFFLINE or HF_HUB_OFFLINE is set). {_OFFLINE_HINT}"
        )
    try:
        model = timm.create_model(spec.name, pretrained=True, **kwargs)
    except Exception as e:  # the hub client raises many kinds of errors
        raise WeightsUnavailableError(
            f"could not fetch pretrained weights for {spec.name!r} from the model hub "
            f"({type(e).__name__}: {e}). {_OFFLINE_HINT}"
        ) from e
    tag = model.pretrained_cfg.get("tag") or "default"
    return model, f"hub:{spec.name}:{tag}"


class Backbone(nn.Module):
    """A frozen timm ViT. Exposes the pieces gather functions need, under timm's names.

    Frozen in one place: ``eval()`` forever, no parameter requires grad, and every
    forward runs under ``torch.inference_mode``.
    """

    model: Any  # a timm VisionTransformer (untyped attributes)

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        weights_id: str,
        numerics: str = "float32",
        runtime: str = "torch",
    ) -> None:
        super().__init__()
        if numerics not in NUMERICS or runtime not in RUNTIMES:
            raise BackboneError(
                f"numerics {numerics!r} / runtime {runtime!r}: use one of {', '.join(NUMERICS)} "
                f"and one of {', '.join(RUNTIMES)}"
            )
        for attr in ("patch_embed", "blocks", "norm"):
            if not hasattr(model, attr):
                raise BackboneError(
                    f"backbone {spec.name!r} is not a timm VisionTransformer (no {attr!r}); "
                    "pick a ViT-family model name"
                )
        self.model = model
        self.spec = spec
        self.base_weights_id = weights_id
        self.numerics = numerics
        self.runtime = runtime
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def weights_id(self) -> str:
        """The identity of this backbone's features: its weights, and its numerics and runtime
        unless float32 (:func:`~mist_fed.cloud.numerics.features_id`)."""
        return features_id(self.base_weights_id, self.numerics, self.runtime)

    def configured(self, numerics: str, runtime: str) -> Backbone:
        """This backbone (the same module, no copy) run in ``numerics`` by ``runtime``."""
        if (numerics, runtime) == (self.numerics, self.runtime):
            return self
        return Backbone(self.model, self.spec, self.base_weights_id, numerics, runtime)

    def train(self, mode: bool = True) -> Backbone:
        """The backbone never leaves eval mode."""
        return super().train(False)

    # -- shape facts ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def has_class_token(self) -> bool:
        return bool(getattr(self.model, "has_class_token", True))

    @property
    def num_tokens(self) -> int:
        patches = int(self.model.patch_embed.num_patches)
        return patches + self.num_prefix_tokens

    @property
    def img_size(self) -> int:
        size = self.model.patch_embed.img_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def geometry(self) -> Geometry:
        """What an edge device needs to know of this backbone (served in the cloud's stats)."""
        return Geometry(
            backbone=self.name,
            weights=self.weights_id,
            num_blocks=self.num_blocks,
            embed_dim=self.embed_dim,
            num_tokens=self.num_tokens,
            num_prefix_tokens=self.num_prefix_tokens,
            img_size=self.img_size,
            num_heads=int(getattr(self.model.blocks[0].attn, "num_heads", 1)),
            model_kwargs=dict(self.spec.model_kwargs),
        )

    def edge_init_state(self, method: str) -> dict[str, torch.Tensor]:
        """The pretrained weights ``method``'s edge net starts from, keyed as in its state dict.

        Partial-1: the last block (``block.*``) and the final norm (``norm.*``); empty for edge
        nets that start from scratch. The cloud serves this to devices, which cannot run the
        backbone. An unknown method raises :class:`ConfigError`.
        """
        if not starts_from_backbone(method):
            return {}
        modules = {"block": self.model.blocks[-1], "norm": self.model.norm}
        return {
            f"{attr}.{key}": value.detach().cpu().contiguous().clone()
            for attr, module in modules.items()
            for key, value in module.state_dict().items()
        }

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing config (input size, mean, std, interpolation, crop)."""
        cfg = dict(timm.data.resolve_data_config({}, model=self.model))
        cfg["input_size"] = (3, self.img_size, self.img_size)  # the model's, if kwargs resized it
        return cfg

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform of this backbone (PIL image -> normalized tensor)."""
        return timm.data.create_transform(**self.data_config, is_training=False)

    # -- forward pieces ------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``z_0``: token embedding (patch embed, position embed, prefix tokens, norm_pre)."""
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def iter_blocks(self, images: torch.Tensor, upto: int | None = None) -> Iterator[torch.Tensor]:
        """Yield ``z_0, z_1, ..., z_upto`` (block outputs before the final norm), one pass."""
        upto = self.num_blocks if upto is None else upto
        if not 0 <= upto <= self.num_blocks:
            raise BackboneError(f"k={upto} is outside 0..{self.num_blocks} for {self.name}")
        x = self.embed(images)
        yield x
        for blk in list(self.model.blocks)[:upto]:
            x = blk(x)
            yield x

    def blocks_upto(self, images: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """``[z_0, ..., z_depth]`` as float32, in this backbone's numerics and runtime."""
        if not 0 <= depth <= self.num_blocks:
            raise BackboneError(f"k={depth} is outside 0..{self.num_blocks} for {self.name}")
        if self.runtime == "openvino":
            return openvino_trunk(self, self.numerics, depth)(images)
        dtype = autocast_dtype(self.numerics)
        with torch.inference_mode():
            if dtype is None:
                return list(self.iter_blocks(images, upto=depth))
            with torch.autocast(images.device.type, dtype=dtype):
                zs = list(self.iter_blocks(images, upto=depth))
            return [z.float() for z in zs]

    def final_token(self, z_n: torch.Tensor) -> torch.Tensor:
        """The final normed class token (mean of patch tokens for class-token-free ViTs)."""
        x = self.model.norm(z_n)
        if self.has_class_token:
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(dim=1)


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    **model_kwargs: Any,
) -> Backbone:
    """Create a frozen backbone by timm or registered name (see module docstring for sources)."""
    spec = BackboneSpec(
        name=name,
        weights=None if weights is None else str(weights),
        random_init=random_init,
        seed=seed,
        model_kwargs=dict(model_kwargs),
    )
    _register_builtins()
    if name in _BACKBONES:
        factory = _BACKBONES.get(name)
    else:
        base = name.split(".")[0]
        if not timm.is_model(base):
            raise BackboneError(
                f"unknown backbone {name!r}: not a timm model and not registered "
                f"(registered: {', '.join(registered_backbones()) or 'none'})"
            )
        factory = _create_timm
    model, weights_id = factory(spec)
    log.info("backbone %s ready (%s)", name, weights_id)
    return Backbone(model, spec, weights_id)

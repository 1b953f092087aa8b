"""3D volumes through 2D extractors: slices out, slice features back into one vector per volume.

The paper embedded every slice along the first axis of a volume with a 2D model, one slice per
forward pass, and concatenated the slice features in order. Here the slices of *all* volumes in a
batch are flattened into one stream and cut into chunks of `slice_batch_size`, so a forward pass
holds many slices whichever volume they came from; the features are put back in place afterwards.

- `reduce`: `concat` (the paper: slice features in slice order, `n_slices x dim`), `mean` or
  `max` over the slices (`dim`, far smaller).
- `axes`: which axes to slice along: `[0]` (the paper), or `[0, 1, 2]` (tri-planar); the
  per-axis features are joined in axis order 0, 1, 2.

A slice is a 1-channel image; each extractor's own preprocessing repeats it to 3 channels and
resizes/normalises it exactly as a 2D image of the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cbmir.config import check_choice, check_int, to_plain
from cbmir.errors import ConfigError
from cbmir.schema import typed

if TYPE_CHECKING:  # torch only where volumes are embedded: `VolumeSpec` checks configs
    import torch

REDUCTIONS = ("concat", "mean", "max")


@dataclass(frozen=True)
class VolumeSpec:
    """How a volume becomes one feature vector (see the module docstring); also the typed
    schema of `model.volume` (`from_config`): types and keys checked by OmegaConf, ranges here."""

    reduce: str = "concat"
    axes: tuple[int, ...] = (0,)
    slice_batch_size: int = 256

    def __post_init__(self) -> None:
        check_choice(self.reduce, REDUCTIONS, "model.volume.reduce")
        axes = tuple(self.axes)
        if not axes or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ConfigError(
                f"model.volume.axes={list(axes)!r}; give distinct axes among 0, 1, 2, "
                "e.g. [0] (the paper) or [0,1,2] (tri-planar)."
            )
        object.__setattr__(self, "axes", tuple(sorted(axes)))
        check_int(self.slice_batch_size, "model.volume.slice_batch_size")

    @classmethod
    def from_config(cls, conf: Mapping[str, Any] | None) -> VolumeSpec:
        """`model.volume` (a DictConfig or dict; None: the defaults) -> a validated spec."""
        return typed(cls, conf, "model.volume")

    def identity(self) -> dict[str, Any]:
        """What changes a volume's features (an embedding-store key part)."""
        return {"reduce": self.reduce, "axes": list(self.axes), "protocol": "2d-slices"}

    def output_dim(
        self, volume_shape: Sequence[int], slice_dim: Callable[[tuple[int, ...]], int]
    ) -> int:
        """Feature size of one (D, H, W) volume; `slice_dim((1, h, w))` is the 2D model's."""
        if len(volume_shape) != 3:
            raise ConfigError(f"a volume must be D x H x W, got shape {tuple(volume_shape)}")
        total = 0
        for axis in self.axes:
            plane = slice_shape(volume_shape, axis)
            dim = int(slice_dim((1, *plane)))
            total += dim * int(volume_shape[axis]) if self.reduce == "concat" else dim
        return total


def slice_shape(volume_shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(h, w) of a slice taken along `axis`: the two remaining axes in their order."""
    return tuple(int(s) for i, s in enumerate(volume_shape) if i != axis)  # type: ignore[return-value]


def slices_along(volumes: torch.Tensor, axis: int) -> torch.Tensor:
    """[B, D, H, W] -> [B * n, 1, h, w]: every slice along `axis` (0, 1, 2), volume by volume,
    in slice order (a copy only when `axis` > 0). The reference layout `embed_volumes` follows."""
    if volumes.ndim != 4:
        raise ValueError(f"expected volumes [B, D, H, W], got shape {tuple(volumes.shape)}")
    return volumes.movedim(axis + 1, 1).flatten(0, 1).unsqueeze(1)


def embed_volumes(
    volumes: torch.Tensor,
    embed_slices: Callable[[torch.Tensor], torch.Tensor],
    spec: VolumeSpec,
) -> torch.Tensor:
    """Volume features [B, output_dim] from a 2D embedder `embed_slices(uint8 [N, 1, h, w])`.

    All slices of all volumes along one axis form one stream, embedded `slice_batch_size` at a
    time; results land in a [B * n, dim] buffer whose row-major layout *is* the concatenation
    in slice order (`concat`), or is reduced over slices (`mean`, `max`).
    """
    import torch

    if volumes.ndim != 4:
        raise ValueError(f"expected volumes [B, D, H, W], got shape {tuple(volumes.shape)}")
    b = volumes.shape[0]
    parts = []
    for axis in spec.axes:
        moved = volumes.movedim(axis + 1, 1)  # [B, n, h, w], a view
        n = moved.shape[1]
        feats = _embed_stream(moved, embed_slices, spec.slice_batch_size)  # [B * n, dim]
        per_volume = feats.view(b, n, -1)
        if spec.reduce == "concat":
            parts.append(per_volume.reshape(b, -1))  # a view: rows are already in order
        elif spec.reduce == "mean":
            parts.append(per_volume.mean(dim=1))
        else:
            parts.append(per_volume.amax(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _embed_stream(
    moved: torch.Tensor, embed_slices: Callable[[torch.Tensor], torch.Tensor], chunk: int
) -> torch.Tensor:
    """Embed the B * n slices of `moved` [B, n, h, w] in chunks; [B * n, dim] in stream order."""
    b, n, h, w = moved.shape
    total = b * n
    out: torch.Tensor | None = None
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        piece = _stream_rows(moved, start, stop)  # [stop - start, 1, h, w]
        feats = embed_slices(piece)
        if feats.ndim != 2 or feats.shape[0] != stop - start:
            raise ValueError(
                f"the 2D extractor returned shape {tuple(feats.shape)} for {stop - start} slices"
            )
        if out is None:
            out = feats.new_empty((total, feats.shape[1]))
        out[start:stop] = feats
    assert out is not None
    return out


def _stream_rows(moved: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Slices start..stop of the flattened [B * n] stream as [m, 1, h, w] (copies only them)."""
    import torch

    b, n, h, w = moved.shape
    if moved.is_contiguous():
        return moved.view(b * n, 1, h, w)[start:stop]
    rows = []
    v, s = divmod(start, n)
    while start < stop:
        take = min(n - s, stop - start)
        rows.append(moved[v, s : s + take])
        start += take
        v, s = v + 1, 0
    return torch.cat(rows, dim=0).unsqueeze(1)


def split_model_config(model_cfg: Any) -> tuple[dict[str, Any], VolumeSpec]:
    """`cfg.model` -> (the extractor's plain config without `volume`, the validated
    `VolumeSpec`).

    Every model config carries `volume` (a default in config.yaml), but extractor classes do not
    take it: instantiate the returned config, not `cfg.model` itself. It is resolved while
    still attached: `name: ${model.model_name}` points into the full config.
    """
    conf = to_plain(model_cfg)
    return conf, VolumeSpec.from_config(conf.pop("volume", None))


def instantiate_extractor(model_cfg: Any) -> tuple[Any, VolumeSpec]:
    """Build the extractor of `cfg.model` and its volume settings (see `split_model_config`)."""
    from hydra.utils import instantiate

    extractor_cfg, spec = split_model_config(model_cfg)
    return instantiate(extractor_cfg), spec

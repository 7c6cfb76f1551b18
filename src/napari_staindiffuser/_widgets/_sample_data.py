"""napari sample data: a SYNTHETIC paired slide and the bundled real H&E (CMU-1-Small-Region).

The synthetic sample is lazy: every layer is a dask pyramid and a region is rendered only when
napari shows it. Level ``k`` of the pyramid is the same synthetic tissue rendered at
``mpp * 2**k`` (the tissue model is physical, in µm), so an overview never renders the full
4096 x 4096 level 0. All layers of one level share one :class:`SyntheticSlide`, whose cache
renders H&E, both IHC stains and both masks of a region together, once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SYNTHETIC_MPP", "SYNTHETIC_SEED", "SYNTHETIC_SHAPE", "cmu1_small_region"]
__all__ += ["synthetic_paired_slide"]

SYNTHETIC_SEED = 20261128
SYNTHETIC_SHAPE = (4096, 4096)
SYNTHETIC_MPP = 0.5
SYNTHETIC_LEVELS = 4  # 4096, 2048, 1024, 512 px
SYNTHETIC_NOTE = "SYNTHETIC: procedurally generated tissue, not a real slide"


def synthetic_paired_slide() -> list[tuple[Any, dict, str]]:
    """Layers of a lazy :class:`~napari_staindiffuser.synthetic.SyntheticSlide`.

    H&E, CD3 IHC and CK8/18 IHC (RGB image layers) and the ground-truth positive-cell mask of
    each stain (labels layers, 1 = positive), all named ``SYNTHETIC ...``, scaled in µm and
    marked ``metadata["synthetic"] = True``. Only the H&E is visible at first.
    """
    from napari_staindiffuser.synthetic import STAINS, SyntheticSlide

    h, w = SYNTHETIC_SHAPE
    slides = [
        SyntheticSlide(SYNTHETIC_SEED, (h >> k, w >> k), SYNTHETIC_MPP * 2**k)
        for k in range(SYNTHETIC_LEVELS)
    ]
    base = {
        "synthetic": True,
        "generator": "napari_staindiffuser.synthetic.SyntheticSlide",
        "seed": SYNTHETIC_SEED,
        "shape": list(SYNTHETIC_SHAPE),
        "mpp": SYNTHETIC_MPP,
        "pyramid": "level k is the same tissue rendered at mpp * 2**k",
    }

    def layer(data: list, name: str, content: str, stain: str | None, kind: str, **kw) -> tuple:
        prov = {**base, "content": content, "stain": stain}
        meta = {"synthetic": True, "note": SYNTHETIC_NOTE, "mpp": SYNTHETIC_MPP}
        meta.update(stain=stain, content=content, provenance=prov)
        kwargs = {"name": name, "multiscale": True, "scale": (SYNTHETIC_MPP, SYNTHETIC_MPP)}
        kwargs.update(metadata=meta, **_units(), **kw)
        return (data, kwargs, kind)

    rgb = {"rgb": True, "contrast_limits": (0, 255)}
    out = [layer([s.he for s in slides], "SYNTHETIC H&E", "H&E", None, "image", **rgb)]
    for st in STAINS:
        ihc = [s.ihc(st) for s in slides]
        name = f"SYNTHETIC {st} IHC"
        out.append(layer(ihc, name, f"{st} IHC", st, "image", visible=False, **rgb))
    for st in STAINS:
        masks = [s.mask(st).astype(np.uint8) for s in slides]
        content = f"{st} ground-truth positive cells (1 = positive)"
        out.append(layer(masks, f"SYNTHETIC {st} truth", content, st, "labels", visible=False))
    return out


def cmu1_small_region() -> list[tuple[Any, dict, str]]:
    """The bundled CMU-1-Small-Region.svs (real Aperio H&E, 0.499 µm/px), through the reader."""
    from napari_staindiffuser.io import sample_svs_path

    from ._reader import read_layers

    return read_layers(sample_svs_path())


def _units() -> dict:
    from ._reader import _layers_take_units

    return {"units": ("um", "um")} if _layers_take_units() else {}

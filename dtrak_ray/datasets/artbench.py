"""ArtBench-10 in its official 256x256 ImageFolder layout, restricted to chosen styles.

Layout (``data.path``; the unpacked ``artbench-10-imagefolder-split.tar``)::

    train/{style}/*.jpg    5000 per style          (pool 0)
    test/{style}/*.jpg     1000 per style          (pool 1)

Styles: art_nouveau, baroque, expressionism, impressionism, post_impressionism, realism,
renaissance, romanticism, surrealism, ukiyo_e. ArtBench-2 is ``[post_impressionism, ukiyo_e]``
(5000 train drawn from their 10000, 1000 Val from their test images); ArtBench-5 adds three
styles (12500 train). Captions for text-to-image training are "a {style} painting" with the
underscore written as a hyphen ("a post-impressionism painting"). The archive is at
https://artbench.eecs.berkeley.edu/files/artbench-10-imagefolder-split.tar; it is not fetched
automatically because no published checksum could be verified here: download it by hand.
"""

from __future__ import annotations

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset
from dtrak_ray.datasets.folder import load_tree
from dtrak_ray.errors import ConfigError

STYLES = (
    "art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism",
    "realism", "renaissance", "romanticism", "surrealism", "ukiyo_e",
)
URL = "https://artbench.eecs.berkeley.edu/files/artbench-10-imagefolder-split.tar"


def caption(style: str) -> str:
    """The paper's prompt for a style: ``a {style} painting``."""
    return f"a {style.replace('_', '-')} painting"


def load(opts: DatasetOptions) -> ImageDataset:
    """The styles ``data.classes`` of ArtBench-10 (required: e.g. [post_impressionism, ukiyo_e])."""
    if not opts.classes:
        raise ConfigError(f"data.classes: artbench needs the styles to use, e.g. [post_impressionism, ukiyo_e]; styles: {', '.join(STYLES)}")
    bad = [c for c in opts.classes if c not in STYLES]
    if bad:
        raise ConfigError(f"data.classes: {bad} are not ArtBench styles; choose from {', '.join(STYLES)}")
    ds = load_tree(opts, "artbench")
    return ImageDataset(
        f"artbench{len(ds.class_names)}", ds.labels, ds.read, ds.pool, ds.class_names,
        {**ds.meta, "captions": [caption(s) for s in ds.class_names]},
    )

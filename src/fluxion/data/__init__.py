"""The shapes world: seeded scenes of flat coloured shapes, rendered and captioned for training and evaluation."""

from fluxion.data.captions import CaptionStyle, caption, caption_styles, describe, noun_phrase
from fluxion.data.dataset import BucketBatchSampler, ShapesDataset, collate, to_tensor
from fluxion.data.render import render
from fluxion.data.shapes import (
    ALL_SHAPES,
    BACKGROUNDS,
    BUCKETS,
    COLORS,
    HELD_OUT_PAIRS,
    HELD_OUT_SHAPES,
    INVERSE_RELATION,
    LAYOUTS,
    PALETTE,
    RELATIONS,
    TRAIN_SHAPES,
    Scene,
    ShapeObject,
    group_scene,
    is_held_out,
    relation_scene,
    sample_scene,
    scene_from_spec,
)

__all__ = [
    "ALL_SHAPES", "BACKGROUNDS", "BUCKETS", "COLORS", "HELD_OUT_PAIRS", "HELD_OUT_SHAPES", "INVERSE_RELATION",
    "LAYOUTS", "PALETTE", "RELATIONS", "TRAIN_SHAPES", "BucketBatchSampler", "CaptionStyle", "Scene", "ShapeObject",
    "ShapesDataset", "caption", "caption_styles", "collate", "describe", "group_scene", "is_held_out", "noun_phrase",
    "relation_scene", "render", "sample_scene", "scene_from_spec", "to_tensor",
]

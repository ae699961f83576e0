"""autopose.data: annotations → person instances → crops, heatmap codec, Parquet proxy, synth.

The public names are re-exported here; import from ``autopose.data``.
"""

from autopose.data.coco import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    COCO_SIGMAS,
    COCO_SKELETON,
    flip_pairs_from_names,
    load_coco,
    load_coco_detections,
)
from autopose.data.codec import HeatmapCodec
from autopose.data.instances import PersonInstance
from autopose.data.mpii import MPII_FLIP_PAIRS, MPII_KEYPOINTS, load_mpii
from autopose.data.proxy import (
    CocoCropDataset,
    ProxyDataset,
    ProxyMetadata,
    ProxyReport,
    SkippedFile,
    build_proxy,
    decode_batch,
    read_proxy_metadata,
    verify_proxy,
)
from autopose.data.synth import (
    DEMO_SHIFT,
    SynthReport,
    SynthShift,
    build_synth_proxies,
    generate_synth,
    parse_shift,
)
from autopose.data.transforms import (
    box_to_center_scale,
    crop_matrix,
    invert_affine,
    parse_size,
    transform_points,
    warp_image,
)

__all__ = [
    "COCO_FLIP_PAIRS",
    "COCO_KEYPOINTS",
    "COCO_SIGMAS",
    "COCO_SKELETON",
    "DEMO_SHIFT",
    "MPII_FLIP_PAIRS",
    "MPII_KEYPOINTS",
    "CocoCropDataset",
    "HeatmapCodec",
    "PersonInstance",
    "ProxyDataset",
    "ProxyMetadata",
    "ProxyReport",
    "SkippedFile",
    "SynthReport",
    "SynthShift",
    "box_to_center_scale",
    "build_proxy",
    "build_synth_proxies",
    "crop_matrix",
    "decode_batch",
    "flip_pairs_from_names",
    "generate_synth",
    "invert_affine",
    "load_coco",
    "load_coco_detections",
    "load_mpii",
    "parse_shift",
    "parse_size",
    "read_proxy_metadata",
    "transform_points",
    "verify_proxy",
    "warp_image",
]

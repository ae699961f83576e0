"""The Parquet proxy: person crops cached once, read fast many times.

``build_proxy`` samples images of a COCO keypoint json (or an HRNet-layout MPII
json) with a seed, cuts one affine crop per person (the training filter of
:func:`~autopose.data.coco.load_coco`), and writes one row per crop::

    image_id     int64          dataset image id
    instance_id  int64          annotation id (MPII: entry index)
    crop         binary         JPEG bytes, RGB: the crop (input_size (h, w)) with canvas_pad
                                (rows, cols) pixels of the image around it on each side
    keypoints    K × 3 float32  (x, y, v) in the stored image's pixels; absent keypoints are (0, 0, 0)
    center       2 float64      crop center in image pixels
    scale        2 float64      crop extent (w, h) in image pixels (the crop's, not the canvas's)
    bbox         4 float64      person box (x, y, w, h) in image pixels
    area         float64        annotation area
    source       string         image file, relative to the image folder

Why a canvas (``margin`` > 1, a train proxy's choice): a policy's turn or zoom-out on a crop
that is already cut fills its corners with black, which a model never sees at test time and
which darkens the crop (the search's BatchNorm term then credits geometric ops with a
brightness change). On a canvas the policy's geometric ops are the crop's maps (same center,
same pixels per degree) and bring in the image around the person instead, as a crop transform
from the full image would (HRNet folds them into it); the crop is cut from the canvas after the
policy (:func:`autopose.data.transforms.cut_window`). A margin of 1.5 costs 2.25× the pixels to store
and decode. Readers get the crop by default; the trainer asks for the canvas.

The file-level key ``autopose`` holds :class:`ProxyMetadata` as json: dataset,
keypoint names, flip pairs, crop size, seed, skipped files and why, a
fingerprint of the inputs (reuse) and a hash of the content (integrity).

Readers: :class:`ProxyDataset` (a torch ``Dataset``, also ``iter_batches`` for
streaming and Ray Data), and :class:`CocoCropDataset`, the on-the-fly path that
reads the full image and crops it each time (same item layout).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from autopose.data.coco import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    coco_instances,
    flip_pairs_from_names,
    validate_coco_dict,
)
from autopose.data.instances import PersonInstance
from autopose.data.mpii import MPII_FLIP_PAIRS, MPII_KEYPOINTS, is_mpii_layout, mpii_instances
from autopose.data.transforms import (
    canvas_crop_matrix,
    canvas_padding,
    canvas_size,
    check_crop_size,
    cut_window,
    transform_points,
    warp_image,
    window_keypoints,
)
from autopose.errors import AutoposeError
from autopose.files import read_json

PROXY_FORMAT = "autopose.proxy/1"
METADATA_KEY = "autopose"
ROWS_PER_GROUP = 256
JPEG_QUALITY = 95


# -- metadata and report ------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedFile:
    """An image the build could not use."""

    file: str
    reason: str


@dataclass(frozen=True)
class ProxyMetadata:
    """What a proxy file says about itself (stored as json under the key ``autopose``)."""

    dataset: str
    keypoint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    input_size: tuple[int, int]
    seed: int
    max_images: int
    num_rows: int
    images_used: int
    skipped: tuple[SkippedFile, ...]
    content_hash: str
    fingerprint: str
    annotation_file: str
    images_dir: str
    jpeg_quality: int = JPEG_QUALITY
    skeleton: tuple[tuple[int, int], ...] = ()
    canvas_pad: tuple[int, int] = (0, 0)
    format: str = PROXY_FORMAT

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def stored_size(self) -> tuple[int, int]:
        """``(height, width)`` of each stored image: the crop and its canvas."""
        return canvas_size(self.input_size, self.canvas_pad)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, path: Path) -> ProxyMetadata:
        try:
            raw = json.loads(text)
            if raw.get("format") != PROXY_FORMAT:
                raise AutoposeError(
                    f"unknown proxy format {raw.get('format')!r}, expected {PROXY_FORMAT}",
                    path=path,
                    field="format",
                )
            rows, cols = raw.get("canvas_pad", (0, 0))  # absent in proxies from before canvases
            return cls(
                dataset=str(raw["dataset"]),
                keypoint_names=tuple(raw["keypoint_names"]),
                flip_pairs=tuple((int(a), int(b)) for a, b in raw["flip_pairs"]),
                input_size=(int(raw["input_size"][0]), int(raw["input_size"][1])),
                seed=int(raw["seed"]),
                max_images=int(raw["max_images"]),
                num_rows=int(raw["num_rows"]),
                images_used=int(raw["images_used"]),
                skipped=tuple(SkippedFile(**s) for s in raw["skipped"]),
                content_hash=str(raw["content_hash"]),
                fingerprint=str(raw["fingerprint"]),
                annotation_file=str(raw["annotation_file"]),
                images_dir=str(raw["images_dir"]),
                jpeg_quality=int(raw["jpeg_quality"]),
                skeleton=tuple((int(a), int(b)) for a, b in raw.get("skeleton", ())),
                canvas_pad=(int(rows), int(cols)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise AutoposeError(f"bad proxy metadata ({error})", path=path, field=METADATA_KEY) from None


@dataclass
class ProxyReport:
    """The outcome of :func:`build_proxy`."""

    path: Path
    rows: int
    images_used: int
    skipped: list[SkippedFile] = field(default_factory=list)
    reused: bool = False
    content_hash: str = ""

    def summary(self) -> str:
        action = "reused" if self.reused else "written"
        return (
            f"proxy {action}: {self.path} ({self.rows} rows from {self.images_used} images, "
            f"{len(self.skipped)} skipped)"
        )


# -- hashing ------------------------------------------------------------------------------
def _schema(num_keypoints: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("instance_id", pa.int64()),
            ("crop", pa.binary()),
            ("keypoints", pa.list_(pa.list_(pa.float32(), 3), num_keypoints)),
            ("center", pa.list_(pa.float64(), 2)),
            ("scale", pa.list_(pa.float64(), 2)),
            ("bbox", pa.list_(pa.float64(), 4)),
            ("area", pa.float64()),
            ("source", pa.string()),
        ]
    )


class _ContentHasher:
    """SHA-256 of a table's values, independent of how rows are split into batches.

    One running hash per column (two for variable-length columns: lengths and bytes),
    combined at the end, so that the build (batch by batch) and the check (whole
    file) agree.
    """

    def __init__(self, schema: pa.Schema):
        self.names = schema.names
        self.values = {name: hashlib.sha256() for name in self.names}
        self.lengths = {name: hashlib.sha256() for name in self.names}

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        for name in self.names:
            column = batch.column(name)
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            for array in chunks:
                if pa.types.is_binary(array.type) or pa.types.is_string(array.type):
                    for value in array.cast(pa.binary()):
                        data = value.as_buffer()
                        self.lengths[name].update(len(data).to_bytes(8, "little"))
                        self.values[name].update(data)
                else:
                    while pa.types.is_fixed_size_list(array.type):
                        array = array.flatten()
                    values = array.to_numpy(zero_copy_only=False)
                    self.values[name].update(
                        np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"))
                    )

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in self.names:
            total.update(name.encode())
            total.update(self.lengths[name].digest())
            total.update(self.values[name].digest())
        return total.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading metadata and checking files ----------------------------------------------------
def _open_parquet(path: Path) -> pq.ParquetFile:
    path = Path(path)
    if not path.is_file():
        raise AutoposeError("proxy file not found", path=path)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise AutoposeError(f"not a readable Parquet file ({error})", path=path) from None


def read_proxy_metadata(path: Path) -> ProxyMetadata:
    """The metadata of a proxy file (reads only the footer)."""
    file = _open_parquet(path)
    key_values = file.metadata.metadata or {}
    if METADATA_KEY.encode() not in key_values:
        raise AutoposeError("not an autopose proxy (no metadata)", path=path, field=METADATA_KEY)
    return ProxyMetadata.from_json(key_values[METADATA_KEY.encode()], Path(path))


def verify_proxy(path: Path) -> ProxyMetadata:
    """Check a proxy file against its content hash; returns its metadata.

    Raises:
        AutoposeError: unreadable file, missing metadata, or rows that do not hash to
            the stored ``content_hash`` (the file changed or is damaged).
    """
    path = Path(path)
    metadata = read_proxy_metadata(path)
    file = _open_parquet(path)
    hasher = _ContentHasher(_schema(metadata.num_keypoints))
    rows = 0
    try:
        for batch in file.iter_batches(batch_size=ROWS_PER_GROUP):
            hasher.update(batch)
            rows += batch.num_rows
    except (pa.ArrowException, OSError, KeyError) as error:
        raise AutoposeError(f"damaged proxy file ({error})", path=path) from None
    if rows != metadata.num_rows or hasher.hexdigest() != metadata.content_hash:
        raise AutoposeError(
            "content hash mismatch: the file changed after it was written; build it again",
            path=path,
            field="content_hash",
        )
    return metadata


# -- building -----------------------------------------------------------------------------
@dataclass
class _Source:
    dataset: str
    keypoint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    instances: list[PersonInstance]


def _load_source(ann: Path, images_dir: Path, aspect_ratio: float) -> _Source:
    """Instances (training filter) and naming from a COCO or HRNet-MPII json."""
    data = read_json(ann)
    if is_mpii_layout(data):
        instances = mpii_instances(data, ann, images_dir, aspect_ratio=aspect_ratio)
        return _Source("mpii", MPII_KEYPOINTS, MPII_FLIP_PAIRS, (), instances)
    dataset, category_id, names = validate_coco_dict(data, ann)
    instances = coco_instances(
        dataset, category_id, names, images_dir, labelled_only=True, aspect_ratio=aspect_ratio
    )
    category = next(c for c in dataset["categories"] if c.get("id") == category_id)
    skeleton = tuple((int(a) - 1, int(b) - 1) for a, b in category.get("skeleton", []))
    flip_pairs = COCO_FLIP_PAIRS if names == COCO_KEYPOINTS else flip_pairs_from_names(names)
    info = dataset.get("info")
    name = "synth" if isinstance(info, dict) and "autopose_synth" in info else "coco"
    return _Source(name, names, flip_pairs, skeleton, instances)


def _images_of(proxy: Path) -> tuple[set[str], str]:
    """The image files (relative to its image folder) a proxy holds, and its content hash."""
    if not proxy.is_file():
        raise AutoposeError("proxy to exclude not found", path=proxy, field="exclude")
    metadata = read_proxy_metadata(proxy)
    try:
        sources = pq.read_table(proxy, columns=["source"]).column("source").to_pylist()
    except (OSError, KeyError, pa.ArrowException) as error:
        raise AutoposeError(f"cannot read its images: {error}", path=proxy, field="exclude") from None
    return set(sources), metadata.content_hash


def _sample_images(instances: list[PersonInstance], max_images: int, seed: int) -> list[str]:
    """Image paths holding persons, ``max_images`` of them drawn with the seed, in id order."""
    by_image = {}
    for inst in instances:
        by_image.setdefault(inst.image_path, inst.image_id)
    paths = sorted(by_image, key=lambda p: (by_image[p], p))
    if len(paths) > max_images:
        chosen = np.random.default_rng(seed).choice(len(paths), size=max_images, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    return paths


def _fingerprint(ann_hash: str, images_dir: Path, image_paths: list[str], settings: dict[str, Any]) -> str:
    """Hash of everything the proxy's content depends on: the annotation bytes, the
    sampled image files (name, size, modification time) and the build settings."""
    digest = hashlib.sha256(json.dumps({"format": PROXY_FORMAT, "ann": ann_hash, **settings}).encode())
    for image_path in image_paths:
        try:
            stat = os.stat(image_path)
            signature = f"{os.path.relpath(image_path, images_dir)}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = f"{os.path.relpath(image_path, images_dir)}:missing"
        digest.update(signature.encode())
    return digest.hexdigest()


def _read_image(path: str) -> Image.Image:
    image = Image.open(path)
    image.load()  # decode now: a truncated or corrupt file fails here, not later
    return image.convert("RGB")


def _crop_row(
    image: Image.Image,
    inst: PersonInstance,
    input_size: tuple[int, int],
    quality: int,
    source: str,
    pad: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    matrix = canvas_crop_matrix(inst.center, inst.scale, input_size, pad)
    crop = warp_image(image, matrix, canvas_size(input_size, pad))
    buffer = io.BytesIO()
    # 4:4:4 chroma: thin limbs keep their colour (left/right cues) in small crops.
    Image.fromarray(crop).save(buffer, format="JPEG", quality=quality, subsampling=0)
    keypoints = np.zeros_like(inst.keypoints, dtype=np.float32)
    labelled = inst.keypoints[:, 2] > 0
    keypoints[labelled, :2] = transform_points(inst.keypoints[labelled, :2], matrix)
    keypoints[:, 2] = inst.keypoints[:, 2]
    return {
        "image_id": inst.image_id,
        "instance_id": inst.instance_id,
        "crop": buffer.getvalue(),
        "keypoints": keypoints.tolist(),
        "center": inst.center.tolist(),
        "scale": inst.scale.tolist(),
        "bbox": np.asarray(inst.bbox, dtype=np.float64).tolist(),
        "area": float(inst.area),
        "source": source,
    }


def _temporary_prefix(out: Path) -> str:
    """Builds of ``out`` write ``<prefix><pid>.tmp`` beside it before the rename: hidden, named
    after the host and process writing it (a folder may be shared between machines)."""
    return f".{out.name}.{socket.gethostname()}."


def _remove_stale_temporaries(out: Path) -> None:
    """Remove what builds of ``out`` on this host left when they were killed: their temporary
    files whose process is gone. A live build's file (another process, or another host's) stays."""
    prefix = _temporary_prefix(out)
    for candidate in out.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = candidate.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            candidate.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _check_build(
    images_dir: Path, out: Path, max_images: int, input_size: tuple[int, int], margin: float
) -> tuple[int, int]:
    """Check ``build_proxy``'s arguments before anything is read; returns the canvas padding.

    Raises:
        AutoposeError: naming the argument.
    """
    if not out.parent.is_dir():
        raise AutoposeError("output folder does not exist", path=out.parent, field="out")
    if out.is_dir():  # checked now, not at the rename after every crop is built
        raise AutoposeError("is a folder: give the .parquet file to write", path=out, field="out")
    if max_images <= 0:
        raise AutoposeError(f"must be positive, got {max_images}", field="max_images")
    try:
        check_crop_size(*input_size)
    except ValueError as error:
        raise AutoposeError(str(error), field="input_size") from None
    try:
        pad = canvas_padding(input_size, margin)
    except ValueError as error:
        raise AutoposeError(str(error), field="margin") from None
    if not images_dir.is_dir():
        raise AutoposeError("image folder does not exist", path=images_dir, field="images")
    return pad


def _reusable(out: Path, fingerprint: str) -> ProxyReport | None:
    """The report of ``out`` when it is a whole proxy of the same inputs, else None."""
    if not out.exists():
        return None
    try:
        existing = read_proxy_metadata(out)
        if existing.fingerprint != fingerprint:
            return None
        verify_proxy(out)
    except AutoposeError:
        return None  # not a usable proxy of these inputs: build a new one over it
    return ProxyReport(
        out, existing.num_rows, existing.images_used, list(existing.skipped), True, existing.content_hash
    )


def _crop_rows(
    image_paths: list[str],
    by_image: dict[str, list[PersonInstance]],
    images_dir: Path,
    size: tuple[int, int],
    jpeg_quality: int,
    pad: tuple[int, int],
    skipped: list[SkippedFile],
    progress: bool,
) -> Iterator[list[dict[str, Any]]]:
    """The proxy's rows, about :data:`ROWS_PER_GROUP` at a time, image by image in order; an
    image that is missing or cannot be decoded is appended to ``skipped`` instead."""
    pending: list[dict[str, Any]] = []
    for image_path in tqdm(image_paths, desc="build-proxy", unit="img", disable=not progress):
        relative = os.path.relpath(image_path, images_dir)
        try:
            image = _read_image(image_path)
        except FileNotFoundError:
            skipped.append(SkippedFile(relative, "missing file"))
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            skipped.append(SkippedFile(relative, f"cannot decode: {error}"))
            continue
        pending.extend(
            _crop_row(image, inst, size, jpeg_quality, relative, pad) for inst in by_image[image_path]
        )
        if len(pending) >= ROWS_PER_GROUP:
            yield pending
            pending = []
    if pending:
        yield pending


def _write_proxy_file(
    out: Path,
    schema: pa.Schema,
    batches: Iterator[list[dict[str, Any]]],
    footer: Callable[[int, str], ProxyMetadata],
) -> ProxyMetadata:
    """Write the rows of ``batches`` and the metadata ``footer(rows, content hash)`` returns to a
    temporary file beside ``out``, then rename it to ``out``: the file appears whole or not at all
    (an error, ``footer``'s too, leaves no temporary behind and ``out`` as it was)."""
    hasher = _ContentHasher(schema)
    rows_written = 0
    tmp = out.parent / f"{_temporary_prefix(out)}{os.getpid()}.tmp"
    writer = None
    try:
        writer = pq.ParquetWriter(
            tmp,
            schema,
            compression={name: ("NONE" if name == "crop" else "SNAPPY") for name in schema.names},
            use_dictionary=["source"],
        )
        for rows in batches:
            batch = pa.RecordBatch.from_pylist(rows, schema=schema)
            hasher.update(batch)
            writer.write_batch(batch)
            rows_written += len(rows)
        metadata = footer(rows_written, hasher.hexdigest())
        writer.add_key_value_metadata({METADATA_KEY: metadata.to_json()})
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return metadata


def build_proxy(
    ann: Path,
    images_dir: Path,
    out: Path,
    *,
    max_images: int = 5000,
    seed: int = 0,
    input_size: tuple[int, int] = (256, 192),
    progress: bool = True,
    jpeg_quality: int = JPEG_QUALITY,
    exclude: Path | None = None,
    margin: float = 1.0,
) -> ProxyReport:
    """Write (or reuse) the Parquet proxy of a keypoint dataset.

    Args:
        ann: COCO keypoint json, or an HRNet-layout MPII json (detected by its layout).
        images_dir: folder of the images the json names.
        out: the ``.parquet`` file to write; its folder must exist.
        max_images: at most this many images, drawn with ``seed`` among those with persons.
        seed: sampling seed.
        input_size: crop ``(height, width)``.
        progress: show a tqdm bar (stderr).
        jpeg_quality: quality of the stored crops.
        exclude: another proxy whose images (by file, relative to the image folder) this one
            must not hold: a held-out split of the same images, e.g. train2017 images for the
            search's policy step that the train proxy does not hold. The images are drawn
            among the rest.
        margin: store each crop on a canvas about this many times its sides (1: the crop
            alone), for a policy's geometric ops to bring in the image around the person (see
            the module docstring). Train proxies want it; val and holdout splits do not.

    Returns:
        A :class:`ProxyReport`. When ``out`` already holds a proxy of the same inputs
        (same fingerprint) whose content hash checks, it is reused untouched.

    Raises:
        AutoposeError: missing output folder, bad json, bad arguments. Nothing is
            written then, and an existing ``out`` is left as it was.

    Missing and undecodable images are skipped, listed in the report and in the
    file's metadata. The file appears atomically (temporary file, then rename).
    """
    ann, images_dir, out = Path(ann), Path(images_dir), Path(out)
    pad = _check_build(images_dir, out, max_images, input_size, margin)
    height, width = input_size

    excluded, excluded_hash = _images_of(Path(exclude)) if exclude is not None else (set(), None)
    source = _load_source(ann, images_dir, aspect_ratio=width / height)
    instances = [i for i in source.instances if os.path.relpath(i.image_path, images_dir) not in excluded]
    image_paths = _sample_images(instances, max_images, seed)
    settings = {
        "max_images": max_images,
        "seed": seed,
        "input_size": [height, width],
        "jpeg_quality": jpeg_quality,
        **({"exclude": excluded_hash} if excluded_hash is not None else {}),
        **({"canvas_pad": list(pad)} if pad != (0, 0) else {}),  # older proxies keep their fingerprint
    }
    fingerprint = _fingerprint(_file_sha256(ann), images_dir, image_paths, settings)
    _remove_stale_temporaries(out)  # left by a build of out that was killed

    reused = _reusable(out, fingerprint)
    if reused is not None:
        return reused

    by_image: dict[str, list[PersonInstance]] = {}
    for inst in instances:
        by_image.setdefault(inst.image_path, []).append(inst)
    skipped: list[SkippedFile] = []
    crops = _crop_rows(
        image_paths, by_image, images_dir, (height, width), jpeg_quality, pad, skipped, progress
    )

    def footer(rows_written: int, content_hash: str) -> ProxyMetadata:
        images_used = len(image_paths) - len(skipped)
        if images_used == 0:
            raise AutoposeError(
                f"none of the {len(image_paths)} sampled images could be read "
                f"(first: {skipped[0].file}: {skipped[0].reason})"
                if skipped
                else "no image holds a person",
                path=images_dir,
                field="images",
            )
        return ProxyMetadata(
            dataset=source.dataset,
            keypoint_names=tuple(source.keypoint_names),
            flip_pairs=tuple(source.flip_pairs),
            input_size=(height, width),
            seed=seed,
            max_images=max_images,
            num_rows=rows_written,
            images_used=images_used,
            skipped=tuple(skipped),
            content_hash=content_hash,
            fingerprint=fingerprint,
            annotation_file=str(ann),
            images_dir=str(images_dir),
            jpeg_quality=jpeg_quality,
            skeleton=source.skeleton,
            canvas_pad=pad,
        )

    metadata = _write_proxy_file(out, _schema(len(source.keypoint_names)), crops, footer)
    if skipped and progress:
        for entry in skipped:
            tqdm.write(f"skipped {entry.file}: {entry.reason}")
    return ProxyReport(out, metadata.num_rows, metadata.images_used, skipped, False, metadata.content_hash)


# -- reading ------------------------------------------------------------------------------
def decode_crop(data: bytes | pa.Buffer) -> torch.Tensor:
    """JPEG bytes → ``3×H×W`` uint8 tensor (RGB)."""
    image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Decoding straight into an array (no convert) is the fast path: about 0.4 ms at 256×192.
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


def decode_batch(
    batch: pa.RecordBatch | pa.Table, *, as_numpy: bool = False, pad: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """A batch of proxy rows → batched arrays (for streaming and Ray Data ``map_batches``).

    Args:
        batch: proxy rows (``batch_format="pyarrow"`` in Ray Data gives a ``pa.Table``).
        as_numpy: return numpy arrays (what Ray Data wants back) instead of tensors.
        pad: the proxy's ``canvas_pad``: the crops are cut out of their canvases.

    Returns:
        ``image B×3×H×W`` uint8, ``keypoints B×K×2`` float32 (crop px),
        ``visibility B×K`` float32, ``center``/``scale B×2`` float64, ``bbox B×4``
        float64, ``area B`` float64, ``image_id``/``instance_id B`` int64.
    """
    columns = _numeric_columns(batch)
    crops = batch.column("crop")
    chunks = crops.chunks if isinstance(crops, pa.ChunkedArray) else [crops]
    images = [decode_crop(value.as_buffer()) for chunk in chunks for value in chunk]
    image = torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    visibility = torch.from_numpy(columns["visibility"])
    image, keypoints = _cut(image, torch.from_numpy(columns["keypoints"]), visibility, pad)
    columns["keypoints"] = keypoints.numpy()
    if as_numpy:
        return {**columns, "image": image.numpy()}
    return {**{name: torch.from_numpy(array) for name, array in columns.items()}, "image": image}


def _cut(
    images: torch.Tensor, keypoints: torch.Tensor, visibility: torch.Tensor, pad: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops out of their canvases; absent keypoints stay at (0, 0), as the file stores them."""
    return cut_window(images, keypoints, pad)[0], _window_keypoints(keypoints, visibility, pad)


def _window_keypoints(
    keypoints: torch.Tensor, visibility: torch.Tensor, pad: tuple[int, int]
) -> torch.Tensor:
    """Labelled keypoints in the crop's pixels; absent ones stay at (0, 0)."""
    return torch.where(visibility[..., None] > 0, window_keypoints(keypoints, pad), keypoints)


def _fixed_list_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(-1, *shape).copy()


def _numeric_columns(table: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray]:
    keypoints_type = table.schema.field("keypoints").type
    num_keypoints = keypoints_type.list_size
    keypoints = _fixed_list_numpy(table.column("keypoints"), (num_keypoints, 3)).astype(np.float32)

    def flat(name: str) -> np.ndarray:
        column = table.column(name)
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return array.to_numpy(zero_copy_only=False).copy()

    return {
        "keypoints": np.ascontiguousarray(keypoints[..., :2]),
        "visibility": np.ascontiguousarray(keypoints[..., 2]),
        "center": _fixed_list_numpy(table.column("center"), (2,)).astype(np.float64),
        "scale": _fixed_list_numpy(table.column("scale"), (2,)).astype(np.float64),
        "bbox": _fixed_list_numpy(table.column("bbox"), (4,)).astype(np.float64),
        "area": flat("area").astype(np.float64),
        "image_id": flat("image_id").astype(np.int64),
        "instance_id": flat("instance_id").astype(np.int64),
    }


class ProxyDataset(torch.utils.data.Dataset):
    """Rows of a proxy file as training samples.

    The file is opened lazily, once per process, so the dataset pickles cheaply into
    DataLoader workers and Ray tasks; each process then holds the file's columns in
    memory (crops stay JPEG-compressed; about 15 kB a row at 256×192).

    Args:
        path: the ``.parquet`` proxy.
        verify: check the content hash once, here (raises :class:`AutoposeError` on a
            mismatch). Workers do not check again.
        canvas: items hold each crop's canvas (``metadata.stored_size``, keypoints in canvas
            pixels) instead of the crop: what a policy that brings in the image around the crop
            wants (:attr:`canvas_pad` says how far in the crop lies). The same as the crop for a
            proxy stored without a margin.

    Items are dicts: ``image`` ``3×H×W`` uint8, ``keypoints`` ``K×2`` float32 (crop px),
    ``visibility`` ``K`` float32, ``center``/``scale`` ``(2,)`` float64, ``bbox``
    ``(4,)`` float64, ``area`` float, ``image_id``/``instance_id`` int. The default
    collate batches them.
    """

    def __init__(self, path: Path, *, verify: bool = True, canvas: bool = False):
        self.path = Path(path)
        self.metadata = verify_proxy(self.path) if verify else read_proxy_metadata(self.path)
        self.canvas = canvas
        self._crops: pa.Array | None = None
        self._columns: dict[str, np.ndarray] | None = None

    @property
    def canvas_pad(self) -> tuple[int, int]:
        """``(rows, cols)`` between each item's image edge and its crop: the proxy's canvas
        padding when items are canvases, else ``(0, 0)``."""
        return self.metadata.canvas_pad if self.canvas else (0, 0)

    @property
    def _window_pad(self) -> tuple[int, int]:
        """How far in the crop lies in what the file stores, when items are the crops."""
        return (0, 0) if self.canvas else self.metadata.canvas_pad

    def __len__(self) -> int:
        return self.metadata.num_rows

    def _load(self) -> None:
        try:
            table = pq.read_table(self.path, memory_map=True)
        except (pa.ArrowException, OSError) as error:
            raise AutoposeError(f"cannot read proxy ({error})", path=self.path) from None
        self._crops = table.column("crop").combine_chunks()
        self._columns = _numeric_columns(table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._columns is None:
            self._load()
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        columns = self._columns
        visibility = torch.from_numpy(columns["visibility"][index])
        image, keypoints = _cut(
            decode_crop(self._crops[index].as_buffer()),
            torch.from_numpy(columns["keypoints"][index]),
            visibility,
            self._window_pad,
        )
        return {
            "image": image,
            "keypoints": keypoints,
            "visibility": visibility,
            "center": torch.from_numpy(columns["center"][index]),
            "scale": torch.from_numpy(columns["scale"][index]),
            "bbox": torch.from_numpy(columns["bbox"][index]),
            "area": float(columns["area"][index]),
            "image_id": int(columns["image_id"][index]),
            "instance_id": int(columns["instance_id"][index]),
        }

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's ``keypoints`` (``N×K×2``, as :meth:`__getitem__` gives them) and
        ``visibility`` (``N×K``), without decoding a crop."""
        if self._columns is None:
            self._load()
        visibility = torch.from_numpy(self._columns["visibility"])
        keypoints = torch.from_numpy(self._columns["keypoints"])
        return _window_keypoints(keypoints, visibility, self._window_pad), visibility

    def iter_batches(self, batch_size: int = 64) -> Iterator[dict[str, Any]]:
        """Stream the file in order as batched tensors (see :func:`decode_batch`)."""
        file = _open_parquet(self.path)
        for batch in file.iter_batches(batch_size=batch_size):
            yield decode_batch(batch, pad=self._window_pad)

    def iter_record_batches(self, batch_size: int = 64) -> Iterator[pa.RecordBatch]:
        """Stream the raw Arrow record batches (crops still JPEG)."""
        yield from _open_parquet(self.path).iter_batches(batch_size=batch_size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_crops"] = state["_columns"] = None  # each process loads its own copy
        return state


class CocoCropDataset(torch.utils.data.Dataset):
    """The on-the-fly path: read the full image, crop it, every time.

    Same items as :class:`ProxyDataset`; what full training on train2017 uses
    through DataLoader workers.

    Args:
        instances: persons from :func:`load_coco` / :func:`load_mpii`.
        input_size: crop ``(height, width)``.
        margin: cut each crop on a canvas about this many times its sides (items are then
            canvases, keypoints in canvas pixels, :attr:`canvas_pad` in from each side).

    Raises (per item):
        AutoposeError: the image file is missing or cannot be decoded.
    """

    def __init__(
        self,
        instances: Sequence[PersonInstance],
        input_size: tuple[int, int] = (256, 192),
        margin: float = 1.0,
    ):
        self.instances = list(instances)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.canvas_pad = canvas_padding(self.input_size, margin)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inst = self.instances[index]
        try:
            image = _read_image(inst.image_path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise AutoposeError(f"cannot read image ({error})", path=inst.image_path) from None
        matrix = canvas_crop_matrix(inst.center, inst.scale, self.input_size, self.canvas_pad)
        crop = warp_image(image, matrix, canvas_size(self.input_size, self.canvas_pad))
        keypoints = np.zeros((inst.keypoints.shape[0], 2), dtype=np.float32)
        labelled = inst.keypoints[:, 2] > 0
        keypoints[labelled] = transform_points(inst.keypoints[labelled, :2], matrix)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),  # copies: writable
            "keypoints": torch.from_numpy(keypoints),
            "visibility": torch.from_numpy(inst.keypoints[:, 2].astype(np.float32)),
            "center": torch.from_numpy(np.asarray(inst.center, dtype=np.float64)),
            "scale": torch.from_numpy(np.asarray(inst.scale, dtype=np.float64)),
            "bbox": torch.from_numpy(np.asarray(inst.bbox, dtype=np.float64)),
            "area": float(inst.area),
            "image_id": int(inst.image_id),
            "instance_id": int(inst.instance_id),
        }

"""Model checkpoints: plain tensors and values, written atomically, read without unpickling code.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings,
booleans, ``None`` and lists/tuples/dicts of them::

    {"format": "autopose.checkpoint/1",
     "state_dict": {name: tensor},          # the model's weights, on the CPU
     "meta": {"arch": "p2net_r50", "num_joints": 17, "input_size": [256, 192],
              "keypoint_names": [...] | None, "flip_pairs": [[1, 2], ...] | None,
              "dataset": "coco" | None, "model_kwargs": {...}},   # build_model's extras
     "extra": {...}}                        # the caller's: epoch, optimizer state, metrics …

It is read back with ``torch.load(weights_only=True)`` only, so a checkpoint
from anywhere can be opened safely: a file holding any other Python object is
refused instead of run.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopose.errors import AutoposeError, first_line
from autopose.files import atomic_write

CHECKPOINT_FORMAT = "autopose.checkpoint/1"
_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, (torch.Tensor, *_PLAIN_SCALARS)):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: dict key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"{where}: {type(value).__name__} cannot go in a checkpoint (tensors, numbers, strings, "
        "lists and dicts only; convert numpy arrays with torch.as_tensor or .tolist())"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    *,
    arch: str,
    num_joints: int,
    input_size: Sequence[int],
    keypoint_names: Sequence[str] | None = None,
    flip_pairs: Sequence[Sequence[int]] | None = None,
    dataset: str | None = None,
    model_kwargs: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the model's weights and what is needed to rebuild it, atomically.

    The file appears complete or not at all: it is written to a temporary file
    in the same folder and moved into place with ``os.replace``.

    Args:
        path: the checkpoint file (its folder is created).
        model: the model (wrappers such as DDP are unwrapped); weights go to the CPU.
        arch: the name :func:`autopose.models.build_model` takes.
        num_joints: K.
        input_size: ``(height, width)``.
        keypoint_names: the dataset's K keypoint names.
        flip_pairs: the dataset's (left, right) index pairs, for the flip test.
        dataset: ``"coco"``, ``"mpii"``, ``"synth"`` …
        model_kwargs: further keyword arguments ``build_model`` needs to rebuild
            this exact model (P2Net switches such as ``use_apm=False``, widths).
        extra: anything else of plain values and tensors (training state such
            as ``optimizer.state_dict()``, epoch, metrics).

    Returns:
        ``path``.

    Raises:
        TypeError: ``extra`` holds something that could not be read back safely.
    """
    path = Path(path)
    height, width = (int(v) for v in input_size)
    meta = {
        "arch": str(arch),
        "num_joints": int(num_joints),
        "input_size": [height, width],
        "keypoint_names": list(keypoint_names) if keypoint_names is not None else None,
        "flip_pairs": [[int(a), int(b)] for a, b in flip_pairs] if flip_pairs is not None else None,
        "dataset": dataset,
        "model_kwargs": dict(model_kwargs or {}),
    }
    _check_plain(meta["model_kwargs"], "model_kwargs")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    state_dict = {name: tensor.detach().cpu() for name, tensor in unwrap_model(model).state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state_dict, "meta": meta, "extra": extra}

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as stream:
        torch.save(payload, stream)
    return path


def load_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles code).

    Returns:
        ``(state_dict, meta)`` where ``meta`` holds ``arch``, ``num_joints``,
        ``input_size`` (a tuple), ``keypoint_names``, ``flip_pairs``, ``dataset``,
        ``model_kwargs`` and ``extra`` (the caller's dict, tensors on the CPU).

    Raises:
        AutoposeError: naming the file: not a file, truncated or corrupt, holding
            objects other than tensors and plain values, or missing a field.
    """
    path = Path(path)
    return _checked(_read_payload(path), path)


def _read_payload(path: Path) -> Any:
    """``torch.load`` with plain values and tensors only; every failure one line naming ``path``."""
    if not path.exists():
        raise AutoposeError("checkpoint not found", path=path)
    if not path.is_file():
        raise AutoposeError("checkpoint is not a file", path=path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph; keep the line that says what was refused.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line), None)
        if culprit is not None:  # the file asks to build Python objects: never done
            raise AutoposeError(
                "not a plain checkpoint: it holds Python objects other than tensors and plain values, "
                f"which are never unpickled ({culprit[:160]})",
                path=path,
            ) from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise AutoposeError(
            f"not a PyTorch checkpoint: truncated, corrupt or another kind of file ({detail[:120]})",
            path=path,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        reason = first_line(error, 160)
        raise AutoposeError(
            f"not a readable checkpoint, truncated or corrupt ({reason})", path=path
        ) from None

    return payload


def _checked(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and the metadata of a loaded payload, every field checked (errors name it)."""
    if not isinstance(payload, dict):
        raise AutoposeError(f"expected a checkpoint dict, got {type(payload).__name__}", path=path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise AutoposeError(
            f"not an autopose checkpoint (expected format {CHECKPOINT_FORMAT!r}, got "
            f"{payload.get('format')!r}; a bare state_dict lacks the architecture to rebuild it)",
            path=path,
            field="format",
        )
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise AutoposeError("missing or not a dict of tensors", path=path, field="state_dict")
    meta = payload.get("meta")
    if not isinstance(meta, dict):
        raise AutoposeError("missing or not a dict", path=path, field="meta")
    if not isinstance(meta.get("arch"), str):
        raise AutoposeError("missing or not a string", path=path, field="meta.arch")
    if not isinstance(meta.get("num_joints"), int) or meta["num_joints"] <= 0:
        raise AutoposeError("missing or not a positive integer", path=path, field="meta.num_joints")
    size = meta.get("input_size")
    if not (
        isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise AutoposeError("missing or not [height, width]", path=path, field="meta.input_size")
    pairs = meta.get("flip_pairs")
    if pairs is not None and not (
        isinstance(pairs, list | tuple)
        and all(
            isinstance(p, list | tuple)
            and len(p) == 2
            and all(isinstance(i, int) and 0 <= i < meta["num_joints"] for i in p)
            for p in pairs
        )
    ):
        raise AutoposeError("expected [left, right] joint index pairs", path=path, field="meta.flip_pairs")
    if not isinstance(meta.get("model_kwargs", {}), dict):
        raise AutoposeError("not a dict", path=path, field="meta.model_kwargs")
    extra = payload.get("extra", {})
    if not isinstance(extra, dict):
        raise AutoposeError("not a dict", path=path, field="extra")
    meta = {
        **meta,
        "input_size": (int(size[0]), int(size[1])),
        "model_kwargs": dict(meta.get("model_kwargs", {})),
        "extra": extra,
    }
    return state_dict, meta


def load_model(path: Path | str, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights (strictly).

    Returns:
        ``(model, meta)``: the model in eval mode on ``device``, and the meta of
        :func:`load_checkpoint`.

    Raises:
        AutoposeError: the checkpoint is bad, names an unknown architecture, or its
            weights do not fit that architecture (lists the first mismatched keys).
    """
    from autopose.models import build_model  # here: reading a checkpoint alone needs no model code

    state_dict, meta = load_checkpoint(path)
    try:
        model = build_model(
            meta["arch"], num_joints=meta["num_joints"], input_size=meta["input_size"], **meta["model_kwargs"]
        )
    except AutoposeError as error:
        raise AutoposeError(
            f"cannot build the model: {error.message}", path=path, field="meta.arch"
        ) from None
    except (KeyError, TypeError, ValueError) as error:
        raise AutoposeError(f"cannot build the model ({error})", path=path, field="meta.arch") from None
    missing, unexpected = _key_mismatch(model.state_dict(), state_dict)
    if missing or unexpected:
        parts = [
            f"{len(keys)} {kind} ({_first_few(keys)})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise AutoposeError(
            f"weights do not fit {meta['arch']}: " + "; ".join(parts), path=path, field="state_dict"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # shapes differ
        reason = str(error).strip().splitlines()
        raise AutoposeError(
            f"weights do not fit {meta['arch']}: {reason[-1].strip()[:200] if reason else error}",
            path=path,
            field="state_dict",
        ) from None
    return model.to(device).eval(), meta


def _first_few(keys: list[str], count: int = 5) -> str:
    return ", ".join(keys[:count]) + (", …" if len(keys) > count else "")


def _key_mismatch(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))

"""Reading a user's calibration set: a text or JSONL file, a folder of images or ``.npy`` / ``.pt``
tensors, or a local ``datasets`` dataset (a ``save_to_disk`` folder). Returns raw samples (strings or
float tensors); the model's task turns them into batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError

__all__ = ["read_calibration"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TENSOR_SUFFIXES = {".npy", ".pt"}


def _text_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BitsmithError(f"cannot read calibration file {path}: {err}") from None
    if path.suffix == ".jsonl":
        samples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise BitsmithError(f"calibration file {path} line {number} is not valid JSON") from None
            value = record.get("text") if isinstance(record, dict) else record
            if not isinstance(value, str):
                raise BitsmithError(f"calibration file {path} line {number} has no string field 'text'")
            samples.append(value)
        return samples
    return [line.strip() for line in text.splitlines() if line.strip()]


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # numpy and torch raise many types for a bad file
        raise BitsmithError(f"cannot read calibration tensor {path}: {type(err).__name__}") from None
    if not isinstance(value, torch.Tensor):
        raise BitsmithError(f"calibration file {path} does not hold a single tensor")
    if value.dim() == 0 or value.numel() == 0:
        raise BitsmithError(f"calibration file {path} holds {'one number' if value.dim() == 0 else 'no values'};"
                            " give a tensor of samples (one per row)")
    if value.is_complex() or value.dtype == torch.bool:
        raise BitsmithError(f"calibration file {path} holds {value.dtype} values, not numbers of an image or input")
    value = value.float()
    if not torch.isfinite(value).all():
        raise BitsmithError(f"calibration file {path} holds NaN or infinite values")
    return value


def _load_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
            return pixels.reshape(1, image.height, image.width).float() / 255.0  # (1, H, W) in [0, 1]
    except (OSError, UnidentifiedImageError):
        raise BitsmithError(f"cannot read calibration image {path}") from None


def _dataset_samples(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise BitsmithError(f"{path} looks like a datasets folder: install the 'datasets' package") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise BitsmithError(f"cannot load the dataset in {path}: {type(err).__name__}") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    for column in ("text", "sentence", "content"):
        if column in data.column_names:
            return list(data[column])
    raise BitsmithError(f"dataset {path} has no text column (text, sentence or content)")


def read_calibration(path: str | Path, samples: int) -> list:
    """Up to ``samples`` raw samples from ``path``; an empty or unreadable set is a BitsmithError."""
    path = Path(path)
    if type(samples) is not int or samples <= 0:
        raise BitsmithError(f"--calib-samples must be a whole number of at least 1, got {samples!r}")
    if not path.exists():
        raise BitsmithError(f"calibration set not found: {path}")
    if path.is_file():
        if path.suffix in TENSOR_SUFFIXES:
            items = list(_load_tensor(path))  # one file holding a batch: its rows are samples
        else:
            items = _text_lines(path)
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        items = _dataset_samples(path)
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | TENSOR_SUFFIXES)
        items = []
        for file in files[:samples]:
            items.append(_load_image(file) if file.suffix.lower() in IMAGE_SUFFIXES else _load_tensor(file))
    if not items:
        raise BitsmithError(f"calibration set {path} is empty")
    return items[:samples]

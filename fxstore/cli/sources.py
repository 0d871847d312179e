"""Data sources named on the command line: image folders, ``.npy`` arrays, ``fake:N``; and text.

Every source is a map-style ``Dataset`` of ``(input, target)`` pairs (``.npy`` gives
inputs only), so the extraction reads each rank's shards directly.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ..errors import ConfigError

__all__ = ["open_source", "open_text_source", "describe_source", "NpyDataset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_source(source: str | os.PathLike[str], image_size: int = 224) -> Dataset[Any]:
    """Open a data source by name.

    Args:
        source: ``fake:N`` (N random images from ``torchvision.datasets.FakeData``, the
            same in every run), a ``.npy`` file (one sample per row, memory-mapped), or an
            image folder laid out for ``torchvision.datasets.ImageFolder``
            (``root/class/image.png``).
        image_size: Side of the square images (resize the short side to
            ``image_size * 8 / 7``, center crop, ImageNet normalisation: the standard
            evaluation transform).

    Returns:
        A map-style dataset.

    Raises:
        ConfigError: the source does not exist or is not one of these forms.

    Example:
        >>> from fxstore.cli.sources import open_source
        >>> data = open_source("fake:4", image_size=32)
        >>> len(data), tuple(data[0][0].shape)
        (4, (3, 32, 32))
    """
    text = os.fspath(source)
    fake = re.fullmatch(r"fake:(\d+)", text)
    if fake:
        return datasets.FakeData(size=int(fake.group(1)), image_size=(3, image_size, image_size), num_classes=10,
                                 transform=_eval_transform(image_size, resize=False))
    path = Path(text)
    if text.endswith(".npy"):
        if not path.is_file():
            raise ConfigError(f"data file '{text}' does not exist.\nHint: pass an existing .npy file.")
        return NpyDataset(path)
    if path.is_dir():
        try:
            return datasets.ImageFolder(text, transform=_eval_transform(image_size))
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(
                f"image folder '{text}' has no images in class folders: {e}\n"
                "Hint: lay it out as root/<class>/<image>.png (torchvision ImageFolder)."
            ) from e
    raise ConfigError(
        f"data source '{text}' is not an image folder, a .npy file or fake:N.\n"
        "Hint: e.g. --data fake:256, --data images/ (root/<class>/<image>) or --data inputs.npy."
    )


def describe_source(source: str | os.PathLike[str], image_size: int = 224) -> str:
    """The data's identity for the run record: the source's name plus a digest of its content.

    An image folder is identified by its list of files with their sizes and modification
    times, a ``.npy`` file by its shape, dtype and the SHA-256 of its bytes, ``fake:N`` by
    itself (its images are the same in every run); the image size is part of it, since the
    transform changes the inputs. Two different folders of the same name therefore never
    resume into each other.

    Example:
        >>> from fxstore.cli.sources import describe_source
        >>> describe_source("fake:4", image_size=32)
        'fake:4 image_size=32'
    """
    text = os.fspath(source)
    label = f"{text} image_size={image_size}"
    path = Path(text)
    if re.fullmatch(r"fake:\d+", text) or not path.exists():
        return label
    digest = hashlib.sha256()
    if path.is_dir():
        count = 0
        for root, dirs, names in sorted(os.walk(path, followlinks=True)):
            dirs.sort()
            for name in sorted(names):
                file = Path(root, name)
                info = file.stat()
                digest.update(f"{file.relative_to(path).as_posix()}|{info.st_size}|{info.st_mtime_ns}\n".encode())
                count += 1
        return f"{label} files={count} sha256:{digest.hexdigest()[:16]}"
    array = np.load(path, mmap_mode="r")
    digest.update(f"{array.shape}|{array.dtype}|".encode())
    flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
    step = max(1, (64 << 20) // max(array.itemsize, 1))
    for lo in range(0, flat.size, step):
        digest.update(np.ascontiguousarray(flat[lo:lo + step]).view(np.uint8))
    return f"{text} shape={list(array.shape)} dtype={array.dtype} sha256:{digest.hexdigest()[:16]}"


def _eval_transform(size: int, resize: bool = True) -> transforms.Compose:
    steps: list[Any] = [transforms.Resize(size * 8 // 7), transforms.CenterCrop(size)] if resize else []
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class NpyDataset(Dataset[torch.Tensor]):
    """Rows of a ``.npy`` array as tensors, floats as float32 (the file is memory-mapped, not loaded).

    ``uint8`` rows of two or more axes are images: they become float32 in ``[0, 1]`` as
    torchvision's ``ToTensor`` makes them (``H x W x C`` rows, ``C`` being 1, 3 or 4, are moved to
    ``C x H x W``; ``C x H x W`` rows keep their layout). Other integer rows (token ids) stay integers.

    Example:
        >>> import tempfile, numpy as np
        >>> from fxstore.cli.sources import NpyDataset
        >>> path = tempfile.mktemp(suffix=".npy"); np.save(path, np.ones((3, 2), np.float64))
        >>> ds = NpyDataset(path); len(ds), ds[0].dtype
        (3, torch.float32)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self.array = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ConfigError(f"'{path}' is not a .npy array: {e}\nHint: save it with numpy.save.") from e
        if self.array.ndim < 1 or self.array.dtype.kind not in "biuf":
            raise ConfigError(
                f"'{path}' holds a {self.array.dtype} array of shape {self.array.shape}; rows of numbers are needed.\n"
                "Hint: save a numeric array whose first axis indexes the samples."
            )

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        row = torch.from_numpy(np.array(self.array[index]))
        if row.dtype == torch.uint8 and row.dim() >= 2:
            return _image_row(row)
        return row.float() if row.is_floating_point() else row


def _image_row(row: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` image row as ``ToTensor`` gives it: float32 in ``[0, 1]``, channels first."""
    if row.dim() == 3 and row.shape[-1] in (1, 3, 4) and row.shape[0] not in (1, 3, 4):
        row = row.permute(2, 0, 1)
    elif row.dim() == 2:
        row = row.unsqueeze(0)
    return row.contiguous().float().div(255)


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_text_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a text source (see :func:`open_text_source`)."""
    path = Path(os.fspath(source))
    return path.suffix in TEXT_SUFFIXES or (path / "dataset_info.json").is_file()


def open_text_source(source: str | os.PathLike[str]) -> Any:
    """Open the documents of a text file or ``datasets`` folder.

    Args:
        source: ``.txt`` (one document per non-blank line), ``.jsonl``/``.json`` (one JSON
            object per line), ``.parquet``, or a folder written by
            ``datasets.Dataset.save_to_disk``. Tables hold a text column (``--text-field``)
            or an ``input_ids`` column (already tokenized).

    Returns:
        A list of strings (``.txt``) or a ``datasets.Dataset``.

    Raises:
        ConfigError: the source does not exist or cannot be read.

    Example:
        >>> import tempfile, os
        >>> from fxstore.cli.sources import open_text_source
        >>> path = os.path.join(tempfile.mkdtemp(), "docs.txt")
        >>> _ = open(path, "w").write("first document\\n\\nsecond one\\n")
        >>> open_text_source(path)
        ['first document', 'second one']
    """
    text = os.fspath(source)
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"text data '{text}' does not exist.\n"
                          "Hint: pass a .txt, .jsonl or .parquet file, or a datasets save_to_disk folder.")
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # fxstore's own bar reports the run
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(text)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(text)
        return datasets.Dataset.from_json(text)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ConfigError(f"cannot read text data '{text}': {type(e).__name__}: {str(e).splitlines()[0]}\n"
                          "Hint: .jsonl needs one JSON object per line; folders must come from save_to_disk.") from e
    finally:
        if enabled:
            datasets.enable_progress_bars()

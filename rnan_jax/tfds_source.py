"""DIV2K (or any TFDS dataset of "hr"/"lr" images) as `sources.PairSpec`s, read through `tfds.data_source`
(array_record, without TensorFlow); a dataset not prepared is a one-line `sources.DataError`, never a download.
"""
from __future__ import annotations

import fnmatch
import logging
import os

import numpy as np

from rnan_jax import images, paths
from rnan_jax.sources import DataError, PairSpec, digest


class _NoVariantWarnings(logging.Filter):
    """Drops TFDS's 'Variant folder ... has no dataset_info.json' warning: the DataError says it in its line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


def _data_root(data_dir: str | None) -> str:
    """The TFDS data folder read: `data_dir`, else TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets),
    absolute (a URL as it is)."""
    return paths.resolve(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _tfds_unprepared(name: str, data_dir: str | None) -> str | None:
    """Why `name` is not prepared under `data_dir` (TFDS's default where None), or None if a version is (the
    version `name` asks for after a colon, as "div2k/bicubic_x4:2.0.0" or "...:2.*.*", if it does)."""
    # the version is a folder under the name: "<name>:2.0.0/<version>" was looked for, and said missing when the
    # version was there and TFDS's reason was another (a damaged dataset_info.json)
    name, _, version = name.partition(":")
    folder = f"{_data_root(data_dir).rstrip('/')}/{name}"
    try:
        versions = paths.listdir(folder) if paths.isdir(folder) else []
        versions = [v for v in versions if not version or fnmatch.fnmatchcase(v, version)]
        if any(paths.exists(f"{folder}/{v}/dataset_info.json") for v in versions):
            return None
    except OSError:  # cannot look (permissions, a bucket not reachable): TFDS's own reason stands
        return None
    return f"not prepared there: no {folder}/{version or '<version>'}/dataset_info.json"


def open_tfds(name: str, split: str, data_dir: str | None):
    """`tfds.data_source(name, split=split, data_dir=data_dir)`: array_record, read without TensorFlow.

    Raises a one-line `DataError` when the dataset is not prepared there (never downloads).
    """
    import tensorflow_datasets as tfds

    quiet = _NoVariantWarnings()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several unrelated types for "not prepared here"
        where = data_dir or "TFDS's default data_dir"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = _tfds_unprepared(name, data_dir) or first
        raise DataError(
            f"cannot read TFDS dataset {name!r} split {split!r} from {where} ({why}); prepare it with "
            "file_format=array_record (README: 'Preparing DIV2K with TFDS') or use data.source='folder'"
        ) from None
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _tfds_example(source, index: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        example = source[index]
        return np.asarray(example["hr"]), np.asarray(example["lr"])
    except Exception as e:  # a damaged record: report it like an unreadable file
        raise images.ImageError(f"{name}: cannot read example ({type(e).__name__}: {e})") from None


def tfds_specs(name: str, split: str, data_dir: str | None) -> list[PairSpec]:
    """One spec per example of the split, in the split's order; an example is read only when loaded."""
    source = open_tfds(name, split, data_dir)
    n = len(source)
    version = getattr(getattr(source, "dataset_info", None), "version", "")
    # the folder read, also when it is TFDS's default: keyed "" there, a run with another $TFDS_DATA_DIR was served
    # the first one's images of a dataset of the same name. A gs:// URL as it is: abspath made it depend on the cwd.
    where = _data_root(data_dir)
    specs = []
    for i in range(n):
        label = f"{name}:{split}[{i}]"
        specs.append(PairSpec(label, digest("tfds", name, version, split, where, n, i),
                              lambda i=i, label=label: _tfds_example(source, i, label), retry_unusable=True))
    return specs

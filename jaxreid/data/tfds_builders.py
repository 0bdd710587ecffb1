"""tensorflow-datasets builders for every dataset jaxreid reads.

The images are never downloaded by TFDS: a user places the dataset (or points
`manual_dir` at it) and the builder converts it with the same readers as the
rest of jaxreid, writing the `array_record` format so that
`tfds.data_source` (and grain) read it without TensorFlow:

    tfds build jaxreid/data/tfds_builders.py --manual_dir=DIR \
        --file_format=array_record   # builds the first builder of the file
    tfds build --imports=jaxreid.data.tfds_builders reid_cuhk03 \
        --manual_dir=../shared/data/cuhk03 --file_format=array_record

Each example holds the encoded image file, pid (evaluation only), camera
(0-based), index and the original path.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxreid.data.datasets import load_dataset


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "pid": tfds.features.Scalar(dtype=np.int32),
            "camera": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
            "path": tfds.features.Text(),
        }
    )


class _ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: subclasses set DATASET (a jaxreid reader name)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DATASET = "market_layout"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point --manual_dir at the dataset root (see jaxreid README)."

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(),
            description=f"{self.DATASET} person re-identification crops (jaxreid reader).",
        )

    def _split_generators(self, dl_manager):
        dataset = load_dataset(self.DATASET, str(dl_manager.manual_dir))
        return {
            split: self._generate_examples(dataset.split(split))
            for split in ("train", "query", "gallery")
        }

    def _generate_examples(self, records):
        for record in records:
            yield (
                record.index,
                {
                    "image": record.path,
                    "pid": record.pid,
                    "camera": record.camera,
                    "index": record.index,
                    "path": record.path,
                },
            )


class ReidMarket1501(_ReidBuilder):
    DATASET = "market1501"


class ReidDukemtmc(_ReidBuilder):
    DATASET = "dukemtmc"


class ReidMsmt17V1(_ReidBuilder):
    DATASET = "msmt17_v1"


class ReidMsmt17V2(_ReidBuilder):
    DATASET = "msmt17_v2"


class ReidCuhk03(_ReidBuilder):
    DATASET = "cuhk03"


class ReidMarketLayout(_ReidBuilder):
    """Any folder in Market-1501 layout (including generated synthetic sets)."""

    DATASET = "market_layout"

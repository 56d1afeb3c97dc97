"""TFDS detection datasets through `tfds.data_source` (random access, ArrayRecord format).

Works for `coco/2017` and any TFDS dataset with the same features: `image`,
`objects/bbox` ((ymin, xmin, ymax, xmax) in [0, 1]), `objects/label`, and optionally
`objects/is_crowd` and `image/id` (the example's index in the split otherwise).

Labels: TFDS's COCO labels are contiguous indices 0..79 into the 80 category names, not
COCO's ids. With `label_mapping="coco"` (what "auto" picks for datasets named `coco/...`
with 80 labels) index i becomes the i-th COCO id (1..90, sorted, as in the annotation file
TFDS was built from), so the model keeps official DETR's 91 classes and converted official
checkpoints work. With "none", labels are used as they are (num_classes = number of labels).
"""

from __future__ import annotations

import numpy as np

from detr_jax.data.coco_categories import COCO_IDS, COCO_NAMES
from detr_jax.data.records import DataError, ImageLoadError, Record, empty_annotations

LABEL_MAPPINGS = ("auto", "coco", "none")


def import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "TFDS datasets need tensorflow-datasets and tensorflow: "
            "pip install 'detr-jax[tfds]'"
        ) from e
    return tfds


class TfdsSource:
    """Random-access TFDS detection dataset.

    Args:
      name: TFDS name, e.g. "coco/2017".
      split: e.g. "train", "validation", "train[:1000]".
      data_dir: TFDS data dir ("" or None: TFDS's default).
      label_mapping: "auto", "coco" or "none" (see module docstring).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, label_mapping: str = "auto"):
        tfds = import_tfds()
        if label_mapping not in LABEL_MAPPINGS:
            raise ValueError(f"label_mapping={label_mapping!r}: expected one of {LABEL_MAPPINGS}")
        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:
            raise DataError(
                f"cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}): {e}. "
                "Random access needs the dataset prepared in ArrayRecord format "
                "(tfds build --file_format=array_record)."
            ) from e
        features = self._source.dataset_info.features
        if "objects" not in features or "bbox" not in features["objects"].keys():
            raise DataError(f"TFDS dataset {name!r} has no 'objects/bbox' feature")
        label_names = list(features["objects"]["label"].names)
        if label_mapping == "auto":
            is_coco = name.split("/")[0] == "coco" and len(label_names) == len(COCO_IDS)
            label_mapping = "coco" if is_coco else "none"
        if label_mapping == "coco":
            if len(label_names) != len(COCO_IDS):
                raise DataError(f"{name}: {len(label_names)} labels, COCO mapping needs 80")
            named = not all(n.isdigit() for n in label_names)  # mock data has names "0".."79"
            if named and [n.replace("_", " ") for n in label_names] != list(COCO_NAMES):
                raise DataError(f"{name}: label names differ from COCO's; use label_mapping='none'")
            self._label_map = np.array(COCO_IDS, np.int32)
            self.category_names = dict(zip(COCO_IDS, COCO_NAMES))
        else:
            self._label_map = np.arange(len(label_names), dtype=np.int32)
            self.category_names = dict(enumerate(label_names))
        self.label_mapping = label_mapping

    @property
    def num_classes(self) -> int:
        return max(self.category_names, default=0) + 1

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        name = f"tfds {self.name} {self.split}[{index}]"
        try:
            example = self._source[index]
        except Exception as e:
            raise ImageLoadError(name, f"cannot read example ({type(e).__name__}: {e})") from None
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) == 0:
            raise ImageLoadError(name, f"unexpected image shape {image.shape}")
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        h, w = image.shape[:2]
        boxes, labels, is_crowd = self._objects(example, h, w)
        image_id = int(example["image/id"]) if "image/id" in example else int(index)
        return Record(
            image=np.ascontiguousarray(image, dtype=np.uint8),
            boxes=boxes,
            labels=labels,
            is_crowd=is_crowd,
            image_id=image_id,
            orig_size=(h, w),
            name=name,
        )

    def annotations(self, index: int) -> Record:
        return self[index]

    def _objects(self, example, h, w):
        objects = example.get("objects", {})
        if "bbox" not in objects:
            return empty_annotations()
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        label = np.asarray(objects["label"], np.int64).reshape(-1)
        crowd = np.asarray(objects.get("is_crowd", np.zeros(len(bbox), bool)), bool).reshape(-1)
        # Real data has equal lengths; TFDS's mock data does not.
        n = min(len(bbox), len(label), len(crowd))
        bbox, label, crowd = bbox[:n], label[:n], crowd[:n]
        if n and (label.min() < 0 or label.max() >= len(self._label_map)):
            raise DataError(f"{self.name}: label {label.max()} out of range")
        ymin, xmin, ymax, xmax = bbox.T
        boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1).astype(np.float32)
        return boxes, self._label_map[label], crowd

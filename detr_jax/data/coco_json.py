"""Reading COCO-format JSON files: the checks the instances source (`coco_folder`) and the
panoptic source (`coco_panoptic`) share, each problem a DatasetFormatError naming the file."""

from __future__ import annotations

import json
import pathlib

from detr_jax.data.records import DatasetFormatError


def read_coco_json(path: str, kind: str) -> dict:
    """The top-level object of a COCO-format JSON file, with "images" and "categories";
    DatasetFormatError naming the file otherwise. `kind`: "instances" or "panoptic", for
    the messages."""
    file = pathlib.Path(path)
    if file.is_dir():
        raise DatasetFormatError(
            f"{path}: is a directory; the annotation file must be a COCO {kind} JSON file "
            f"(such as annotations/{kind}_train2017.json)"
        )
    if not file.is_file():
        raise DatasetFormatError(f"{path}: annotation file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.end]!r}, {e.reason}); "
            "a COCO annotation file is UTF-8 JSON"
        ) from None
    if not text.strip():
        raise DatasetFormatError(f"{path}: annotation file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"{path}: not a COCO annotation file (top level is a {type(data).__name__}, "
            "expected an object with 'images', 'annotations' and 'categories')"
        )
    missing = [key for key in ("images", "categories") if key not in data]
    if missing:
        raise DatasetFormatError(
            f"{path}: not a COCO annotation file: missing {', '.join(map(repr, missing))} "
            f"(found keys: {', '.join(sorted(data)) or 'none'})"
        )
    return data


def parse_categories(data: dict, path: str) -> dict[int, str]:
    """{category id: name} of the file's "categories" (ids non-negative integers)."""
    names = {}
    for i, category in enumerate(as_list(data, "categories", path)):
        try:
            names[int(category["id"])] = str(category.get("name", category["id"]))
        except (KeyError, TypeError, ValueError):
            raise DatasetFormatError(f"{path}: categories[{i}] has no integer 'id'") from None
    if any(i < 0 for i in names):
        raise DatasetFormatError(f"{path}: negative category id {min(names)}")
    return names


def parse_images(data: dict, path: str) -> dict[int, tuple[str, tuple[int, int] | None]]:
    """{image id: (file_name, (height, width) or None)}."""
    images = {}
    for i, image in enumerate(as_list(data, "images", path)):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DatasetFormatError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        image_id = int(image["id"])
        if image_id in images:
            raise DatasetFormatError(f"{path}: duplicate image id {image_id}")
        size = None
        if "height" in image and "width" in image:
            size = (int(image["height"]), int(image["width"]))
        images[image_id] = (str(image["file_name"]), size)
    return images


def as_list(data: dict, key: str, path: str, required: bool = True) -> list:
    """data[key], which must be a list ([] when absent and not `required`)."""
    value = data.get(key, None if required else [])
    if not isinstance(value, list):
        raise DatasetFormatError(f"{path}: {key!r} must be a list, got {type(value).__name__}")
    return value

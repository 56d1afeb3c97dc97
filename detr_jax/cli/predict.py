"""`detr-jax predict`: detections (and with a mask head panoptic segments) of image files; a
JSON and a drawn PNG per image."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from detr_jax.evaluation import visualize
from detr_jax.cli.common import DTYPE_CHOICES, checkpoint_command_config, positive_int, probability
from detr_jax.data.records import ImageLoadError
from detr_jax.serving.predictor import IMAGE_EXTENSIONS, Predictor, find_images, load_image
from detr_jax.evaluation.segmentation_postprocess import to_coco_panoptic


def add_parser(sub) -> None:
    parser = sub.add_parser("predict", help="detect objects in images; JSON and drawn PNG per image")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    parser.add_argument("--score_threshold", type=probability, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--top_k", type=positive_int, default=100, help="keep at most this many detections per image")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="images per compiled batch")
    parser.add_argument("--no_draw", action="store_true", help="JSON only, no PNGs")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args, overrides: dict[str, str]) -> int:
    config, overrides = checkpoint_command_config(args, overrides)
    return predict_main(args.checkpoint, args.inputs, args.out, config=config, overrides=overrides,
                        score_threshold=args.score_threshold, top_k=args.top_k, dtype=args.dtype,
                        batch_size=args.batch_size, draw=not args.no_draw, progress=not args.no_progress)


def _unique_stem(path: pathlib.Path, used: set[str]) -> str:
    stem = path.stem or "image"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def predict_main(
    checkpoint: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    overrides: Mapping[str, Any] | None = None,
    score_threshold: float = 0.5,
    top_k: int | None = 100,
    dtype: str | None = None,
    batch_size: int | None = None,
    draw: bool = True,
    progress: bool = True,
) -> int:
    """`detr-jax predict --checkpoint CKPT IMAGES_OR_FOLDERS... --out DIR`.

    Writes to `out_dir`, per readable image `<stem>.json` ({"file", "height", "width",
    "detections": [{"label", "name", "score", "box_xyxy"}]}, pixel xyxy of the image as
    viewed) and `<stem>.png` (the detections drawn; skipped when not `draw`), and
    `detections.json` with every image plus the failures. With a mask head (model.masks)
    also `<stem>_panoptic.png` (COCO panoptic: RGB-encoded segment ids, official DETR's
    post-processing), the image's "segments_info" in its JSON, `panoptic.json` (COCO
    panoptic predictions of every image) and the segments drawn instead of the boxes. An
    unreadable image is reported (file and problem) and skipped; the others go on.

    `config` None: the checkpoint's own config, with `overrides` (dotted keys) applied.

    Returns the exit status: 0 if at least one image was processed, 1 if none was (all
    failed, or no image found).
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files, failures, ignored = find_images(inputs)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(checkpoint, config, overrides, dtype=dtype, batch_size=batch_size)

    records, used_stems, panoptic = [], set(), []
    segment = predictor.segments
    chunk_size = 4 * predictor.batch_size  # images held in memory at once
    with tqdm(total=len(files), unit="image", desc="predict", disable=not progress or len(files) <= 1) as bar:
        for start in range(0, len(files), chunk_size):
            chunk = files[start : start + chunk_size]
            loaded = []
            for path in chunk:
                try:
                    loaded.append((path, load_image(path)))
                except ImageLoadError as e:
                    failures.append((str(path), e.reason))
                    bar.write(f"skipping {path}: {e.reason}", file=sys.stderr)
            queries = predictor.predict_queries([a for _, a in loaded])
            for (path, array), image_queries in zip(loaded, queries):
                stem = _unique_stem(path, used_stems)
                dets = predictor.detections_of(image_queries, array, score_threshold, top_k)
                record = {"file": str(path), **dets.to_json()}
                if segment:
                    segmentation = predictor.segmentation_of(image_queries, array)
                    png, entry = to_coco_panoptic(segmentation, len(panoptic) + 1, f"{stem}_panoptic.png")
                    (out_dir / entry["file_name"]).write_bytes(png)
                    panoptic.append({**entry, "file": str(path)})
                    record.update(segments_info=entry["segments_info"], panoptic_png=entry["file_name"])
                (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
                record["json"] = f"{stem}.json"
                if draw:
                    drawn = (visualize.draw_segments(array, segmentation.id_map, segmentation.segments_info,
                                                     predictor.class_names) if segment else
                             visualize.draw_detections(array, dets.boxes, dets.labels, dets.scores,
                                                       predictor.class_names))
                    drawn.save(out_dir / f"{stem}.png")
                    record["png"] = f"{stem}.png"
                records.append(record)
            bar.update(len(chunk))

    summary = {
        "checkpoint": str(checkpoint),
        "score_threshold": score_threshold,
        "top_k": top_k,
        "dtype": predictor.dtype,
        "images": records,
        "failed": [{"file": f, "error": reason} for f, reason in failures],
    }
    (out_dir / "detections.json").write_text(json.dumps(summary, indent=2) + "\n")
    if segment:  # COCO panoptic predictions: {"annotations": [...]} beside the PNGs (image ids 1..N)
        categories = [{"id": i, "name": predictor.class_names.get(i, f"class {i}"), "isthing": int(thing)}
                      for i, thing in sorted(predictor.category_isthing.items())]
        (out_dir / "panoptic.json").write_text(json.dumps({"annotations": panoptic, "categories": categories},
                                                          indent=2) + "\n")
    num_dets = sum(len(r["detections"]) for r in records)
    print(f"predicted {len(records)} image(s), {num_dets} detection(s) with score >= {score_threshold}; "
          f"results in {out_dir}")
    if ignored:
        print(f"ignored {ignored} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for f, reason in failures:
            print(f"  {f}: {reason}", file=sys.stderr)
    if not records:
        print("error: no image could be processed" if files or failures else "error: no images found", file=sys.stderr)
        return 1
    return 0

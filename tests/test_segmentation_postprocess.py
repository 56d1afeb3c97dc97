"""Segmentation post-processing (detr_jax.evaluation.segmentation_postprocess) against its references:
official DETR's PostProcessSegm and PostProcessPanoptic (transcribed in torch below, on
unpadded inputs where our padding handling changes nothing) and Hugging Face's
`DetrImageProcessor.post_process_panoptic_segmentation`; the padding independence of ours.

Tolerance: outputs are discrete (masks, id maps, areas) and compared exactly. Against the
official transcriptions the mask logits are multiples of 1/16 and the upsampling is x4
(weights multiples of 1/8), so every bilinear value is exact in float32 in any order of
summation and both sides take the same decisions. HF's method resamples sigmoid
probabilities to an arbitrary size, where the two agree to float32 rounding (~1e-6); a
pixel could only differ if a value lay that close to a decision boundary, which these
fixed-seed inputs do not.
"""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from detr_jax.evaluation import segmentation_postprocess as sp

# Categories 0..4 (+ "no object" = 5): 0-2 things, 3-4 stuff.
ISTHING = {0: True, 1: True, 2: True, 3: False, 4: False}
NO_OBJECT = 5


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def quantized_masks(rng, queries: int, h: int, w: int) -> np.ndarray:
    """float32 [Q, h, w] logits, multiples of 1/16 in [-2.5, 2.5]: exact under x4 bilinear."""
    return (rng.integers(-40, 41, (queries, h, w)) / 16).astype(np.float32)


def region_masks(rng, queries: int, h: int, w: int) -> np.ndarray:
    """float32 [Q, h, w] logits: +4 on each query's own cell of a random partition of the
    grid, -4 elsewhere, plus N(0, 1) noise (random predictions HF's overlap test accepts)."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h, queries), rng.uniform(0, w, queries)
    owner = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2).argmin(0)
    own = owner == np.arange(queries)[:, None, None]
    return (np.where(own, 4.0, -4.0) + rng.normal(0, 1, (queries, h, w))).astype(np.float32)


def class_logits_for(labels: list[int], confident: list[bool]) -> np.ndarray:
    """[Q, 6] logits: query q's most probable class is labels[q] (NO_OBJECT allowed), with
    probability ~0.998 where confident[q], else ~0.80 (kept by HF's 0.5, not official's 0.85)."""
    logits = np.zeros((len(labels), NO_OBJECT + 1), np.float32)
    for q, (label, sure) in enumerate(zip(labels, confident)):
        logits[q, label] = 8.0 if sure else 3.0
    return logits


# ---------------------------------------------------------------------------------------
# The official reference, transcribed from facebookresearch/detr models/segmentation.py


def rgb2id(color: np.ndarray) -> np.ndarray:
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*id_map.shape, 3), np.uint8)
    id_map = id_map.copy()
    for i in range(3):
        rgb[..., i] = id_map % 256
        id_map //= 256
    return rgb


def official_panoptic_reference(torch, class_logits, mask_logits, size, target_size, is_thing_map, threshold=0.85):
    """Official PostProcessPanoptic.forward for one image -> (id map [H, W] decoded from its
    PNG, segments_info)."""
    F = torch.nn.functional
    cur_logits, cur_masks = torch.from_numpy(class_logits), torch.from_numpy(mask_logits)
    scores, labels = cur_logits.softmax(-1).max(-1)
    keep = labels.ne(cur_logits.shape[-1] - 1) & (scores > threshold)
    cur_scores, cur_classes = cur_logits.softmax(-1).max(-1)
    cur_scores, cur_classes, cur_masks = cur_scores[keep], cur_classes[keep], cur_masks[keep]
    # util.misc.interpolate: torch's, except that an empty input gives an empty output
    cur_masks = (F.interpolate(cur_masks[None], tuple(size), mode="bilinear").squeeze(0) if cur_masks.numel()
                 else cur_masks.new_empty((0, *size)))
    h, w = cur_masks.shape[-2:]
    cur_masks = cur_masks.flatten(1)
    stuff_equiv_classes = defaultdict(list)
    for k, label in enumerate(cur_classes):
        if not is_thing_map[label.item()]:
            stuff_equiv_classes[label.item()].append(k)

    def get_ids_area(masks, scores, dedup=False):
        m_id = masks.transpose(0, 1).softmax(-1)
        if m_id.shape[-1] == 0:
            m_id = torch.zeros((h, w), dtype=torch.long)
        else:
            m_id = m_id.argmax(-1).view(h, w)
        if dedup:
            for equiv in stuff_equiv_classes.values():
                if len(equiv) > 1:
                    for eq_id in equiv:
                        m_id.masked_fill_(m_id.eq(eq_id), equiv[0])
        final_h, final_w = target_size
        seg_img = Image.fromarray(id2rgb(m_id.view(h, w).numpy()))
        seg_img = seg_img.resize(size=(final_w, final_h), resample=Image.NEAREST)
        m_id = torch.from_numpy(rgb2id(np.asarray(seg_img)))
        area = [m_id.eq(i).sum().item() for i in range(len(scores))]
        return area, seg_img

    area, seg_img = get_ids_area(cur_masks, cur_scores, dedup=True)
    if cur_classes.numel() > 0:
        while True:
            filtered_small = torch.as_tensor([area[i] <= 4 for i, c in enumerate(cur_classes)], dtype=torch.bool)
            if filtered_small.any().item():
                cur_scores = cur_scores[~filtered_small]
                cur_classes = cur_classes[~filtered_small]
                cur_masks = cur_masks[~filtered_small]
                area, seg_img = get_ids_area(cur_masks, cur_scores)
            else:
                break
    segments_info = [{"id": i, "isthing": is_thing_map[cur_classes[i].item()], "category_id": cur_classes[i].item(),
                      "area": a} for i, a in enumerate(area)]
    with io.BytesIO() as out:
        seg_img.save(out, format="PNG")
        png = out.getvalue()
    return rgb2id(np.asarray(Image.open(io.BytesIO(png)))), segments_info


def assert_equals_official(ours: sp.PanopticSegmentation, reference) -> None:
    """Ours = official with ids + 1 (official's map is all 0 when it has no segment)."""
    ref_ids, ref_info = reference
    np.testing.assert_array_equal(ours.id_map, ref_ids + 1 if ref_info else np.zeros_like(ref_ids))
    assert ours.segments_info == [{**s, "id": s["id"] + 1} for s in ref_info]


def run_both(torch, class_logits, masks, size, orig_size):
    ours = sp.panoptic_segmentation(class_logits, masks, size, orig_size, ISTHING)  # "official" by default
    reference = official_panoptic_reference(torch, class_logits, masks, size, orig_size, ISTHING)
    assert_equals_official(ours, reference)
    return ours, reference


# ---------------------------------------------------------------------------------------
# Official panoptic


@pytest.mark.parametrize("orig_size", [(24, 28), (37, 45), (17, 19)])
def test_official_panoptic_matches_reference(torch, orig_size):
    rng = np.random.default_rng(0)
    labels = [0, 3, 1, NO_OBJECT, 4, 2, 0, 1]
    class_logits = class_logits_for(labels, [True, True, True, True, True, True, False, True])
    masks = quantized_masks(rng, len(labels), 6, 7)
    ours, _ = run_both(torch, class_logits, masks, (24, 28), orig_size)
    assert len(ours.segments_info) >= 4  # the case has several segments of both kinds
    assert {s["isthing"] for s in ours.segments_info} == {True, False}


def test_official_two_stuff_queries_of_one_class(torch):
    """Queries 1 and 3 are both class 3 (stuff): the first pass gives all of their pixels to
    query 1, query 3 (area 0) is dropped, and the recompute (no merge) hands query 3's
    pixels to whichever query has the largest logit there."""
    rng = np.random.default_rng(1)
    class_logits = class_logits_for([0, 3, 1, 3], [True] * 4)
    masks = quantized_masks(rng, 4, 6, 7)
    masks[3, :3] += 2.0  # query 3 dominates the top half before being merged
    ours, _ = run_both(torch, class_logits, masks, (24, 28), (30, 33))
    assert [s["category_id"] for s in ours.segments_info].count(3) == 1


def test_official_drops_tiny_segments(torch):
    """Query 2 wins a single grid cell's neighbourhood; at 1/4 of the processed size that is
    at most 4 pixels, so it is dropped and the map recomputed without it."""
    class_logits = class_logits_for([0, 4, 2], [True] * 3)
    masks = np.zeros((3, 6, 7), np.float32)
    masks[0, :, :4] = 1.0
    masks[1, :, 4:] = 1.0
    masks[2, 2, 2] = 2.5
    ours, (_, ref_info) = run_both(torch, class_logits, masks, (24, 28), (6, 7))
    assert [s["category_id"] for s in ours.segments_info] == [0, 4]
    # The same query survives at the processed size.
    assert [s["category_id"] for s in sp.official_panoptic(class_logits, masks, (24, 28), (24, 28),
                                                          ISTHING).segments_info] == [0, 4, 2]


def test_official_no_kept_query(torch):
    class_logits = class_logits_for([NO_OBJECT, 1, 3], [True, False, False])  # 1 and 3 below 0.85
    masks = quantized_masks(np.random.default_rng(2), 3, 6, 7)
    ours, _ = run_both(torch, class_logits, masks, (24, 28), (20, 21))
    assert ours.segments_info == [] and not ours.id_map.any()


# ---------------------------------------------------------------------------------------
# Hugging Face panoptic


def hf_panoptic(torch, class_logits, masks, orig_size, **options):
    """HF's post-processing of one image -> (segmentation [H, W], segments_info)."""
    detr = pytest.importorskip("transformers.models.detr.modeling_detr")
    processor = pytest.importorskip("transformers").DetrImageProcessor()
    outputs = detr.DetrSegmentationOutput(logits=torch.from_numpy(class_logits)[None],
                                          pred_masks=torch.from_numpy(masks)[None])
    result = processor.post_process_panoptic_segmentation(outputs, target_sizes=[orig_size], **options)[0]
    return result["segmentation"].numpy(), result["segments_info"]


def test_huggingface_matches_transformers(torch):
    rng = np.random.default_rng(5)
    labels = [0, 3, 1, 4, 2, NO_OBJECT, 0, 1, 2, 3]  # the repeated stuff class 3 comes last (see the next test)
    class_logits = class_logits_for(labels, [True, False, True, True, False, True, True, False, True, True])
    masks = region_masks(rng, len(labels), 6, 7)
    options = dict(threshold=0.5, mask_threshold=0.5, overlap_mask_area_threshold=0.8, label_ids_to_fuse={3, 4})
    ours = sp.panoptic_segmentation(class_logits, masks, (24, 28), (41, 37), ISTHING, method="huggingface", **options)
    hf_map, hf_info = hf_panoptic(torch, class_logits, masks, (41, 37), **options)
    np.testing.assert_array_equal(ours.id_map, hf_map)
    hf_segments = {s["id"]: s["label_id"] for s in hf_info}  # a fused segment is listed once per query
    assert [(s["id"], s["category_id"]) for s in ours.segments_info] == sorted(hf_segments.items())
    assert [s["area"] for s in ours.segments_info] == [int((hf_map == i).sum()) for i in sorted(hf_segments)]
    # The case keeps several segments, fuses two queries and rejects one of the 9 kept queries.
    assert 9 > len(hf_info) > len(hf_segments) >= 5


def test_huggingface_no_kept_query_is_void(torch):
    class_logits = class_logits_for([NO_OBJECT, NO_OBJECT], [True, True])
    masks = np.zeros((2, 6, 7), np.float32)
    ours = sp.huggingface_panoptic(class_logits, masks, (24, 28), (10, 12), ISTHING)
    hf_map, hf_info = hf_panoptic(torch, class_logits, masks, (10, 12))
    assert hf_info == [] and (hf_map == -1).all()  # HF marks the whole map -1
    assert ours.segments_info == [] and ours.id_map.shape == (10, 12) and not ours.id_map.any()


def test_huggingface_fused_id_reuse_does_not_collide(torch):
    """HF counts on from a reused fused id: stuff 3 (id 1), thing 0 (id 2), stuff 3 again
    (id 1), thing 1 -> id 2 again, HF's bug. Ours gives thing 1 id 3; otherwise the same
    pixels."""
    class_logits = class_logits_for([3, 0, 3, 1], [True] * 4)
    masks = np.full((4, 6, 7), -4.0, np.float32)
    for q, cols in enumerate([slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 7)]):
        masks[q, :, cols] = 4.0
    ours = sp.huggingface_panoptic(class_logits, masks, (24, 28), (24, 28), ISTHING, label_ids_to_fuse={3})
    hf_map, hf_info = hf_panoptic(torch, class_logits, masks, (24, 28), label_ids_to_fuse={3})
    assert [(s["id"], s["label_id"]) for s in hf_info] == [(1, 3), (2, 0), (1, 3), (2, 1)]
    assert [(s["id"], s["category_id"]) for s in ours.segments_info] == [(1, 3), (2, 0), (3, 1)]
    np.testing.assert_array_equal(np.minimum(ours.id_map, 2), hf_map)


def test_huggingface_overlap_ratio_in_float32(torch):
    """Query 0 owns 4 of the 5 pixels where it is confident: ratio 4/5, which HF's float32
    division rounds above 0.8, so the segment is kept. Output size = grid size: no
    resampling, exact values."""
    class_logits = class_logits_for([0, 3], [True, True])
    masks = np.full((2, 4, 5), -4.0, np.float32)
    masks[0, 0, :] = 4.0
    masks[1, 1:, :] = masks[1, 0, 4] = 6.0
    ours = sp.huggingface_panoptic(class_logits, masks, (16, 20), (4, 5), ISTHING)
    hf_map, hf_info = hf_panoptic(torch, class_logits, masks, (4, 5), label_ids_to_fuse={3})
    np.testing.assert_array_equal(ours.id_map, hf_map)
    assert [(s["category_id"], s["area"]) for s in ours.segments_info] == [(0, 4), (3, 16)]
    assert [s["label_id"] for s in hf_info] == [0, 3]


def test_huggingface_fuses_stuff_by_default():
    class_logits = class_logits_for([3, 3], [True, True])
    masks = np.zeros((2, 6, 7), np.float32)
    masks[0, :, :3] = masks[1, :, 3:] = 4.0
    ours = sp.huggingface_panoptic(class_logits, masks, (24, 28), (24, 28), ISTHING)
    assert [(s["id"], s["category_id"], s["area"]) for s in ours.segments_info] == [(1, 3, 24 * 28)]


# ---------------------------------------------------------------------------------------
# Instance masks


@pytest.mark.parametrize("size, orig_size", [((24, 28), (37, 45)), ((21, 26), (30, 19)), ((17, 28), (17, 28))])
def test_instance_masks_match_official(torch, size, orig_size):
    """Official PostProcessSegm with the batch padded to (24, 28) (its max image size)."""
    F = torch.nn.functional
    masks = quantized_masks(np.random.default_rng(4), 5, 6, 7)
    ours = sp.instance_masks(masks, size, orig_size)
    up = F.interpolate(torch.from_numpy(masks)[None], size=(24, 28), mode="bilinear", align_corners=False)
    binary = (up.sigmoid() > 0.5)[0, :, : size[0], : size[1]].unsqueeze(1)
    reference = F.interpolate(binary.float(), size=orig_size, mode="nearest").byte()[:, 0].numpy().astype(bool)
    assert ours.dtype == bool and ours.shape == (5, *orig_size)
    np.testing.assert_array_equal(ours, reference)
    assert 0 < ours.mean() < 1


# ---------------------------------------------------------------------------------------
# Padding independence, formats, bad input


def test_padding_does_not_change_the_result():
    """The same image in two buckets: the small bucket's grid is the large one's top-left
    corner (the image's part of the grid and one cell more, all that bilinear reads)."""
    rng = np.random.default_rng(5)
    large = region_masks(rng, 6, 10, 12)
    small = large[:, :8, :9]
    class_logits = class_logits_for([0, 3, 1, 4, 2, 0], [True] * 6)
    size, orig_size = (28, 32), (39, 45)
    np.testing.assert_array_equal(sp.instance_masks(small, size, orig_size), sp.instance_masks(large, size, orig_size))
    for method in sp.PANOPTIC_METHODS:
        a = sp.panoptic_segmentation(class_logits, small, size, orig_size, ISTHING, method=method)
        b = sp.panoptic_segmentation(class_logits, large, size, orig_size, ISTHING, method=method)
        np.testing.assert_array_equal(a.id_map, b.id_map)
        assert a.segments_info == b.segments_info and len(a.segments_info) >= 3


def test_to_coco_panoptic_round_trip():
    class_logits = class_logits_for([0, 4], [True, True])
    masks = np.zeros((2, 6, 7), np.float32)
    masks[0, :, :3] = masks[1, :, 3:] = 4.0
    segmentation = sp.official_panoptic(class_logits, masks, (24, 28), (24, 28), ISTHING)
    segmentation.id_map[0, 0] = 0  # a void pixel
    segmentation.id_map[1, 0] = 300  # an id that needs two bytes
    png, entry = sp.to_coco_panoptic(segmentation, image_id=7, file_name="000000000007.png")
    np.testing.assert_array_equal(rgb2id(np.asarray(Image.open(io.BytesIO(png)))), segmentation.id_map)
    assert entry == {"image_id": 7, "file_name": "000000000007.png", "segments_info": segmentation.segments_info}


def test_bad_input_is_named():
    masks = np.zeros((2, 6, 7), np.float32)
    class_logits = class_logits_for([0, 1], [True, True])
    with pytest.raises(ValueError, match="does not fit the padded size"):
        sp.instance_masks(masks, (25, 28), (10, 10))
    with pytest.raises(ValueError, match=r"\[Q, K \+ 1\]"):
        sp.official_panoptic(class_logits[:1], masks, (24, 28), (10, 10), ISTHING)
    # A class the mapping does not list is a thing: never merged, never an error.
    halves = np.zeros((2, 6, 7), np.float32)
    halves[0, :, :3] = halves[1, :, 3:] = 4.0
    unlisted = sp.official_panoptic(class_logits, halves, (24, 28), (24, 28), {0: True})
    assert [(s["category_id"], s["isthing"]) for s in unlisted.segments_info] == [(0, True), (1, True)]
    with pytest.raises(ValueError, match="unknown panoptic post-processing method 'detectron'"):
        sp.panoptic_segmentation(class_logits, masks, (24, 28), (10, 10), ISTHING, method="detectron")

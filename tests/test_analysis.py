"""`detr-jax analyze` and the attention weights it reads (issue: what DETR learns, shown).

Attention: rows are softmax distributions (sum 1 within float32 rounding, 1e-5 over <= 64
keys) and padded keys weigh exactly 0 (their logits are float32's minimum, whose exp
underflows to 0). Slot statistics are checked against a direct re-implementation from
their definitions to 1e-9 (float64 both ways: only summation order differs). The command
runs on a tiny DETR converted from an official-layout checkpoint, with the dilated (DC5)
backbone, and its report is opened in headless Chromium.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from detr_jax.analysis import forward_with_attention, mutual_information_bits, slot_statistics
from detr_jax.analysis.slots import box_sizes, location_cells
from detr_jax.cli.main import main
from detr_jax.serving.predictor import Predictor
from detr_jax.models import build_model, init_variables


def padded_pair():
    """Two images in a 64x64 batch: one fills it, one is 40x48 (padding below and right)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    mask = np.ones((2, 64, 64), bool)
    mask[1, 40:] = False
    mask[1, :, 48:] = False
    return images, mask


@pytest.fixture(scope="module")
def tiny_attention():
    config = tiny_config(**{"model.num_encoder_layers": 2})
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images, mask = padded_pair()

    @jax.jit
    def run(variables, images, mask):
        return (forward_with_attention(model, variables, images, mask)[1],
                forward_with_attention(model, variables, images, mask, encoder_layers=(-1,), decoder_layers=(0, -1),
                                       average_heads=True)[1],
                model.apply(variables, images, mask))

    per_head, averaged, plain = run(variables, images, mask)
    return config, per_head, averaged, plain, model.apply(variables, images, mask, intermediates=True)


def test_attention_rows_sum_to_one_and_padded_keys_get_zero(tiny_attention):
    config, per_head, _, _, outputs = tiny_attention
    feature_mask = np.asarray(outputs["memory_mask"]).reshape(2, -1)  # [B, S]
    assert feature_mask[0].all() and not feature_mask[1].all()  # image 1 has padded cells
    heads, layers_enc, layers_dec = config.model.num_heads, 2, config.model.num_decoder_layers
    q, s = config.model.num_queries, feature_mask.shape[1]
    shapes = {"encoder_self": (layers_enc, 2, heads, s, s), "decoder_cross": (layers_dec, 2, heads, q, s),
              "decoder_self": (layers_dec, 2, heads, q, q)}
    for name, shape in shapes.items():
        weights = np.asarray(per_head[name])
        assert weights.shape == shape and weights.dtype == np.float32, name
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5, err_msg=name)
        assert (weights >= 0).all()
    for name in ("encoder_self", "decoder_cross"):
        weights = np.asarray(per_head[name])
        assert (weights[:, 1][..., ~feature_mask[1]] == 0).all(), f"{name}: padded keys must weigh 0"
        assert (weights[:, 1][..., feature_mask[1]] > 0).all()


def test_head_average_is_the_mean_of_the_heads_and_layers_are_chosen(tiny_attention):
    _, per_head, averaged, plain, _ = tiny_attention
    np.testing.assert_allclose(averaged["encoder_self"], np.asarray(per_head["encoder_self"])[[-1]].mean(2),
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(averaged["decoder_cross"], np.asarray(per_head["decoder_cross"])[[0, -1]].mean(2),
                               rtol=0, atol=1e-7)
    assert averaged["decoder_cross"].ndim == 4  # [n, B, Q, S]: no heads axis
    # Not asked for, nothing is kept: the plain forward returns the predictions alone.
    assert sorted(plain) == ["pred_boxes", "pred_logits"]


def test_a_layer_that_does_not_exist_is_named():
    config = tiny_config()
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images, mask = padded_pair()
    with pytest.raises(ValueError, match="decoder layer 2 does not exist: the model has 2"):
        forward_with_attention(model, variables, images, mask, decoder_layers=(2,))


# ---------------------------------------------------------------------------------------
# Slot statistics, against their definitions.


def specialized_predictions(num_images=400, num_slots=6, num_classes=4, seed=0, specialized=True):
    """Random predictions; with `specialized`, slot q's centres cluster around its own spot
    and its class is mostly q % (num_classes - 1) + 1."""
    rng = np.random.default_rng(seed)
    spots = rng.uniform(0.15, 0.85, size=(num_slots, 2))
    centres = (spots[None] + rng.normal(0, 0.05, size=(num_images, num_slots, 2)) if specialized
               else rng.uniform(0, 1, size=(num_images, num_slots, 2)))
    sizes = rng.uniform(0.05, 0.6, size=(num_images, num_slots, 2))
    boxes = np.concatenate([np.clip(centres, 0, 1), sizes], -1).astype(np.float32)
    own = np.arange(num_slots) % (num_classes - 1) + 1
    labels = np.where(rng.uniform(size=(num_images, num_slots)) < (0.8 if specialized else 0.0), own[None],
                      rng.integers(1, num_classes, size=(num_images, num_slots))).astype(np.int32)
    scores = rng.uniform(0, 1, size=(num_images, num_slots)).astype(np.float32)
    return scores, labels, boxes


def mi_by_definition(x, y):
    """sum over (a, b) of p(a, b) log2(p(a, b) / (p(a) p(b))), from the samples."""
    n = len(x)
    total = 0.0
    for a in np.unique(x):
        for b in np.unique(y):
            joint = np.sum((x == a) & (y == b)) / n
            if joint > 0:
                total += joint * np.log2(joint / (np.mean(x == a) * np.mean(y == b)))
    return total


def check_against_definitions(stats, scores, labels, boxes, threshold, grid):
    """Every per-slot number and every MI of `stats`, recomputed from the raw predictions."""
    num_images, num_slots = scores.shape
    boxes = boxes.astype(np.float64)
    for q, slot in enumerate(stats["per_slot"]):
        keep = scores[:, q] >= threshold
        assert slot["confident"] == int(keep.sum()) and slot["predictions"] == num_images
        assert slot["mean_score"] == pytest.approx(float(np.mean(scores[:, q].astype(np.float64))), abs=1e-9)
        classes = {int(c): n for c, n in slot["classes"].items()}  # JSON keys are strings
        assert classes == {int(c): int(n) for c, n in zip(*np.unique(labels[keep, q], return_counts=True))}
        if keep.any():
            cx, cy = boxes[keep, q, 0], boxes[keep, q, 1]
            assert slot["confident_w_mean"] == pytest.approx(boxes[keep, q, 2].mean(), abs=1e-9)
            assert slot["confident_cy_std"] == pytest.approx(np.sqrt(np.mean((cy - cy.mean()) ** 2)), abs=1e-9)
            spread = np.sqrt(np.mean((cx - cx.mean()) ** 2 + (cy - cy.mean()) ** 2))
            assert slot["confident_centre_spread"] == pytest.approx(spread, abs=1e-9)
        assert slot["all_cx_mean"] == pytest.approx(boxes[:, q, 0].mean(), abs=1e-9)
    slots = np.broadcast_to(np.arange(num_slots), scores.shape)
    for subset, keep in (("all", np.ones(scores.shape, bool)), ("confident", scores >= threshold)):
        cols = np.minimum((boxes[..., 0] * grid).astype(int), grid - 1)
        rows = np.minimum((boxes[..., 1] * grid).astype(int), grid - 1)
        size = np.sqrt(boxes[..., 2] * boxes[..., 3])[keep]
        low, high = np.quantile(size, [1 / 3, 2 / 3])
        values = {"location": (rows * grid + cols)[keep], "class": labels[keep],
                  "size": (size >= low).astype(int) + (size >= high)}
        for prop, value in values.items():
            measured = stats["specialization"][subset][prop]
            assert measured["samples"] == int(keep.sum())
            assert measured["mi_bits"] == pytest.approx(mi_by_definition(slots[keep], value), abs=1e-9), (subset, prop)


def test_slot_statistics_are_their_definitions_and_tell_specialization_from_chance():
    threshold, grid = 0.5, 4
    for specialized in (True, False):
        scores, labels, boxes = specialized_predictions(specialized=specialized)
        stats = slot_statistics(scores, labels, boxes, num_classes=4, score_threshold=threshold, grid=grid,
                                shuffles=20)
        check_against_definitions(stats.to_json(), scores, labels, boxes, threshold, grid)
        for prop in ("location", "class"):
            m = stats.specialization["confident"][prop]
            if specialized:  # far above what shuffled slots give
                assert m["mi_bits"] > 10 * m["baseline_mi_bits"] and m["mi_share"] > 0.5, prop
            else:  # i.i.d. slots: within the shuffled baseline's spread
                assert abs(m["mi_bits"] - m["baseline_mi_bits"]) < 4 * m["baseline_std_bits"] + 1e-3, prop


def test_cells_in_a_box():
    from detr_jax.analysis import AttentionSample
    from detr_jax.analysis.figures import cells_in_box

    # A 48x64 image padded to 64x64, 4x4 cells of 16 px: 3 rows and 4 columns are real.
    feature_mask = np.zeros((4, 4), bool)
    feature_mask[:3] = True
    sample = AttentionSample(0, (48, 64), (16.0, 16.0), feature_mask, None, np.zeros((1, 16)))
    inside = cells_in_box(sample, np.array([0.5, 0.5, 0.5, 0.7]))  # x in [.25, .75], y in [.15, .85]
    # Column centres 8, 24, 40, 56 px of 64; row centres 8, 24, 40 px of 48.
    np.testing.assert_array_equal(inside, [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]])


def test_mutual_information_helpers():
    x = np.array([0, 0, 1, 1])
    assert mutual_information_bits(x, x, 2, 2) == pytest.approx(1.0)  # one bit, fully shared
    assert mutual_information_bits(x, np.array([0, 1, 0, 1]), 2, 2) == pytest.approx(0.0, abs=1e-12)
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.99, 0.3, 0.04, 0.16], [1.0, 1.0, 0.1, 0.1]])
    np.testing.assert_array_equal(location_cells(boxes, 4), [0, 7, 15])  # the edge joins the last cell
    np.testing.assert_allclose(box_sizes(boxes), [0.2, 0.08, 0.1])


# ---------------------------------------------------------------------------------------
# The command, on converted official-layout weights with a DC5 backbone.

SMALL_DATA = {
    "data.synthetic_eval_examples": 10, "data.synthetic_image_size": "(48, 64)", "data.eval_scale": 64,
    "data.eval_max_size": 64, "data.bucket_shapes": "((64, 64),)", "eval.batch_size": 4,
}


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """`detr-jax convert` of a random tiny official-layout DETR (DC5), then `detr-jax analyze`."""
    pytest.importorskip("torch")
    from test_convert import save_as, tiny_reference

    from detr_jax.cli.convert import convert_main

    tmp = tmp_path_factory.mktemp("analyze")
    source = save_as("official", tiny_reference("sine"), tmp)
    convert_main(source, tmp / "converted", overrides={"model.num_heads": 4, "model.dilation": True})
    out = tmp / "report"
    argv = ["analyze", "--checkpoint", str(tmp / "converted"), "--out", str(out), "--score_threshold", "0.2",
            "--attention_images", "3", "--no_progress"] + [f"--config.{k}={v}" for k, v in SMALL_DATA.items()]
    assert main(argv) == 0
    return tmp / "converted", out


def test_analyze_writes_every_file_and_its_numbers_are_the_raw_predictions(analyzed):
    checkpoint, out = analyzed
    for name in ("index.html", "slots.json", "slots.csv", "predictions.npz", "query_slots_all.png",
                 "query_slots_confident.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    pictures = sorted((out / "attention").glob("*.png"))
    assert [p.name for p in pictures] == ["image_00000.png", "image_00001.png", "image_00002.png"]
    raw = np.load(out / "predictions.npz")
    assert raw["scores"].shape == (10, 7) and raw["boxes"].shape == (10, 7, 4)
    np.testing.assert_array_equal(raw["source_index"], np.arange(10))

    # The raw predictions are the model's: the same as the Predictor's on the same images.
    predictor = Predictor.from_checkpoint(checkpoint, overrides=SMALL_DATA)
    from detr_jax.data import make_source

    source = make_source(predictor.config.data, "eval")
    expected = predictor.predict_queries([source[i].image for i in range(10)])
    np.testing.assert_allclose(raw["scores"], np.stack([e["scores"] for e in expected]), atol=1e-5)
    np.testing.assert_array_equal(raw["labels"], np.stack([e["labels"] for e in expected]))

    document = json.loads((out / "slots.json").read_text())
    assert document["settings"]["score_threshold"] == 0.2 and document["settings"]["num_slots"] == 7
    check_against_definitions(document, raw["scores"], raw["labels"], raw["boxes"], 0.2, 4)
    assert [a["file"] for a in document["attention"]] == [f"attention/{p.name}" for p in pictures]
    decoder_maps = [share for a in document["attention"] for share in a["decoder_in_box"]]
    assert document["attention_in_box"]["decoder"]["maps"] == len(decoder_maps) > 0
    assert document["attention_in_box"]["decoder"]["attention_in_box"] == pytest.approx(
        np.mean([share["attention_in_box"] for share in decoder_maps]))
    with (out / "slots.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slot"]) for r in rows] == list(range(7))
    assert [int(r["confident"]) for r in rows] == [s["confident"] for s in document["per_slot"]]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is needed for the report test (.ci/run installs Debian's chromium)")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000"]


def test_the_report_renders_in_headless_chromium(analyzed, tmp_path):
    chromium = find_chromium()
    _, out = analyzed
    page = (out / "index.html").resolve().as_uri()
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    # 2 slot grids + 3 attention pictures, every one decoded by the browser.
    assert "pictures: all 5 loaded" in dom, dom[-2000:]
    assert 'data-pictures="ok"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400", page],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1280) and pixels.std() > 10  # not a blank page


def test_a_model_without_an_encoder_and_a_bad_layer(tmp_path, capsys):
    """No DETR encoder (as synthetic_vit_tiny): no encoder maps, the rest as usual; a layer
    index beyond the model is a config error naming the option."""
    from detr_jax.analysis import analyze
    from detr_jax.config.errors import ConfigError

    config = tiny_config(**{"model.num_encoder_layers": 0, "data.synthetic_eval_examples": 4})
    variables = init_variables(build_model(config.model), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="decoder_layer=-3: the model has 2 decoder layers"):
        analyze(variables, config, tmp_path, decoder_layer=-3)
    stats = analyze(variables, config, tmp_path, attention_images=1, progress=False, score_threshold=0.0)
    document = json.loads((tmp_path / "slots.json").read_text())
    assert document["attention"][0]["points"] == [] and stats.settings["num_images"] == 4
    assert (tmp_path / "attention" / "image_00000.png").is_file()


@pytest.mark.parametrize("arch", ["conditional_detr", "dab_detr"])
def test_family_members_are_analyzed_through_the_same_attention_maps(arch, tmp_path):
    """analyze reads any detector's sown attention by layer name, not DETR's module tree:
    Conditional DETR's and DAB-DETR's maps have DETR's shapes, their rows sum to one, and
    the command writes its files for them."""
    from detr_jax.analysis import analyze

    config = tiny_config(**{"model.arch": arch, "model.pre_norm": False, "data.synthetic_eval_examples": 4})
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images = jnp.zeros((2, 64, 64, 3), jnp.uint8)
    mask = jnp.ones((2, 64, 64), bool).at[1, :, 40:].set(False)
    outputs, attention = forward_with_attention(model, variables, images, mask)
    m = config.model
    cells = outputs["memory_mask"][0].size
    assert attention["encoder_self"].shape == (m.num_encoder_layers, 2, m.num_heads, cells, cells)
    assert attention["decoder_self"].shape == (m.num_decoder_layers, 2, m.num_heads, m.num_queries, m.num_queries)
    assert attention["decoder_cross"].shape == (m.num_decoder_layers, 2, m.num_heads, m.num_queries, cells)
    np.testing.assert_allclose(attention["decoder_cross"].sum(-1), 1.0, atol=1e-5)
    analyze(variables, config, tmp_path, attention_images=1, progress=False, score_threshold=0.0)
    assert (tmp_path / "slots.json").is_file() and (tmp_path / "attention" / "image_00000.png").is_file()


def test_deformable_attention_is_drawn_as_its_sampling_points(tmp_path):
    """Deformable DETR sows no attention map but its sampling locations and weights:
    forward_with_attention returns those of the chosen layers (each head's weights sum to
    one over levels x points), and analyze draws them per detection (the paper's Figure 6)
    with their share of weight in the box in its JSON."""
    from conftest import REFINE_TWO_STAGE, tiny_deformable_config

    from detr_jax.analysis import analyze

    config = tiny_deformable_config(REFINE_TWO_STAGE, **{"data.synthetic_eval_examples": 4})
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images = jnp.zeros((2, 64, 64, 3), jnp.uint8)
    mask = jnp.ones((2, 64, 64), bool).at[1, :, 40:].set(False)
    _, attention = forward_with_attention(model, variables, images, mask, decoder_layers=(-1,))
    m, args = config.model, config.model.transformer_args
    assert "decoder_cross" not in attention and "encoder_self" not in attention  # no dense map is sown
    points = (m.num_heads, args["num_feature_levels"], 4)
    assert attention["decoder_cross_locations"].shape == (1, 2, m.num_queries, *points, 2)
    assert attention["decoder_cross_weights"].shape == (1, 2, m.num_queries, *points)
    np.testing.assert_allclose(attention["decoder_cross_weights"].sum((-2, -1)), 1.0, atol=1e-5)
    assert attention["encoder_self_weights"].shape[:3] == (m.num_encoder_layers, 2, 8 * 8 + 4 * 4 + 2 * 2 + 1)

    analyze(variables, config, tmp_path, attention_images=2, progress=False, score_threshold=0.0)
    document = json.loads((tmp_path / "slots.json").read_text())
    assert [a["file"] for a in document["attention"]] == ["attention/image_00000.png", "attention/image_00001.png"]
    for record in document["attention"]:
        assert (tmp_path / record["file"]).stat().st_size > 0
        shares = record["decoder_in_box"]
        assert [s["slot"] for s in shares] == record["slots"] and len(shares) == min(6, m.num_queries)
        assert all(0 <= s["attention_in_box"] <= 1 and 0 <= s["cells_in_box"] <= 1 for s in shares)
    assert document["attention_in_box"]["decoder"]["maps"] == 2 * min(6, m.num_queries)

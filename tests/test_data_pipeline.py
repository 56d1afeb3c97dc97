"""The grain pipeline: batch contract, determinism, resume, multi-host slicing, eval padding."""

import json
import re

import grain
import numpy as np
import pytest

from detr_jax.config import ConfigError
from detr_jax.data import (
    BATCH_KEYS,
    make_eval_iterator,
    make_source,
    make_train_iterator,
    num_eval_batches,
    num_examples,
    steps_per_epoch,
)
from detr_jax.data import batching
from detr_jax.data.config import data_config, validate


def _tiny_data(**overrides):
    data = data_config()
    data.update(
        dict(
            synthetic_train_examples=12, synthetic_eval_examples=7, synthetic_image_size=(40, 72),
            train_scales=(48, 56, 64), train_max_size=96, crop_scales=(48, 56), crop_size=(32, 48),
            eval_scale=64, eval_max_size=96, bucket_step=32, max_boxes=6, num_threads=0,
        )
    )
    data.update(overrides)
    return data


def _train(data, batch_size=4, seed=0, shard_index=0, shard_count=1, **kw):
    return make_train_iterator(data, batch_size, seed, shard_index, shard_count, **kw)


def _assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract():
    data = _tiny_data()
    buckets = batching.make_buckets((), 96, 32)
    for batch in [next(_train(data)), next(make_eval_iterator(data, 4, 0, 1))]:
        assert set(batch) == set(BATCH_KEYS)
        n, H, W, _ = batch["image"].shape
        assert n == 4 and batch["image"].dtype == np.uint8 and batch["mask"].shape == (n, H, W)
        assert batch["labels"].shape == (n, 6) and batch["labels"].dtype == np.int32
        assert batch["boxes"].shape == (n, 6, 4) and batch["boxes"].dtype == np.float32
        assert batch["valid"].dtype == bool and batch["is_real"].dtype == bool
        assert batch["image_id"].dtype == np.int64 and batch["size"].dtype == np.int32
        assert batch["orig_size"].dtype == np.int32
        # the bucket is the smallest that holds the batch
        need = batch["size"].max(0)
        assert (H, W) == batching.choose_bucket(buckets, *need, 32)[0]
        rows, cols = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
        expected_mask = (rows < batch["size"][:, 0, None, None]) & (cols < batch["size"][:, 1, None, None])
        np.testing.assert_array_equal(batch["mask"], expected_mask)
        assert np.all(batch["image"][~batch["mask"]] == 0) and batch["image"][batch["mask"]].any()
        valid = batch["valid"]
        assert valid.sum() > 0 and np.all(valid[:, :1] | ~valid.any(1, keepdims=True))
        assert np.all(batch["boxes"][~valid] == 0) and np.all(batch["labels"][~valid] == 0)
        boxes = batch["boxes"][valid]
        assert np.all(boxes > 0) and np.all(boxes <= 1)
        assert np.all(boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6) and np.all(boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6)
        assert set(batch["labels"][valid].tolist()) <= {1, 2, 3}


def test_eval_batch_holds_the_resized_image_and_its_boxes():
    data = _tiny_data()
    source = make_source(data, "eval")
    batch = next(make_eval_iterator(data, 4, 0, 1, source=source))
    record = source[2]
    h, w = batch["size"][2]
    assert min(h, w) == 64 or max(h, w) == 96
    assert tuple(batch["orig_size"][2]) == record.orig_size and batch["image_id"][2] == record.image_id
    from PIL import Image

    resized = np.asarray(Image.fromarray(record.image).resize((w, h), Image.BILINEAR))
    np.testing.assert_array_equal(batch["image"][2, :h, :w], resized)
    oh, ow = record.orig_size
    x0, y0, x1, y1 = record.boxes.T / np.array([[ow], [oh], [ow], [oh]])
    expected = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)
    np.testing.assert_allclose(batch["boxes"][2][batch["valid"][2]], expected, atol=1e-5)


def test_training_is_deterministic_for_a_seed():
    data = _tiny_data()
    a, b, c = _train(data, seed=1), _train(data, seed=1), _train(data, seed=2)
    first_a, first_c = [next(a) for _ in range(3)], [next(c) for _ in range(3)]
    for batch in first_a:
        _assert_same_batch(batch, next(b))
    assert any(not np.array_equal(x["image_id"], y["image_id"]) for x, y in zip(first_a, first_c))


def test_epochs_cover_the_dataset_and_reshuffle():
    data = _tiny_data()
    it = _train(data, batch_size=4)
    epochs = [np.concatenate([next(it)["image_id"] for _ in range(3)]) for _ in range(2)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(12))
    assert epochs[0].tolist() != epochs[1].tolist()


def test_state_restore_gives_the_same_next_batches():
    data = _tiny_data()
    it = _train(data)
    for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    restored = _train(data)
    restored.set_state(state)
    for batch in expected:
        _assert_same_batch(batch, next(restored))


def test_grain_checkpoint_handler_saves_and_restores(tmp_path):
    data = _tiny_data()
    it = _train(data)
    next(it)
    grain.checkpoint.CheckpointHandler().save(tmp_path, it)
    expected = next(it)
    restored = grain.checkpoint.CheckpointHandler().restore(tmp_path, _train(data))
    _assert_same_batch(expected, next(restored))


def test_hosts_read_disjoint_slices_and_form_the_same_global_batches():
    data = _tiny_data()
    single = _train(data, batch_size=4)
    hosts = [_train(data, batch_size=4, shard_index=i, shard_count=2) for i in range(2)]
    seen = []
    for _ in range(3):  # one epoch
        whole = next(single)
        parts = [next(h) for h in hosts]
        assert all(p["image"].shape[0] == 2 for p in parts)
        ids = np.concatenate([p["image_id"] for p in parts])
        # Concatenated in host order, the parts are the single-process batch element for
        # element (so per-position randomness such as dropout is the same too).
        assert ids.tolist() == whole["image_id"].tolist()
        for key in ("boxes", "size", "labels", "valid"):  # augmentation included
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(12))


def test_eval_covers_every_example_once_across_hosts_with_fillers():
    data = _tiny_data()  # 7 eval examples
    assert num_eval_batches(7, 4, 2) == 2
    real_ids, batch_counts = [], []
    for host in range(2):
        batches = list(make_eval_iterator(data, 4, host, 2))
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == 2
            real_ids.extend(batch["image_id"][batch["is_real"]].tolist())
            fillers = ~batch["is_real"]
            assert np.all(batch["image_id"][fillers] == -1) and not batch["valid"][fillers].any()
    assert batch_counts == [2, 2]
    assert real_ids == list(range(7))  # in order, each once


def test_boxes_beyond_max_boxes_are_truncated_and_counted(caplog):
    data = _tiny_data(synthetic_num_objects=(4, 4), synthetic_object_size=(0.2, 0.25), max_boxes=2, crop_prob=0.0)
    it = make_eval_iterator(data, 4, 0, 1)
    with caplog.at_level("WARNING"):
        batch = next(it)
    assert "more boxes than data.max_boxes" in caplog.text
    assert batch["valid"].all()
    assert it.stats.truncated_boxes == sum(len(make_source(data, "eval")[i].labels) - 2 for i in range(4)) > 0


def test_buckets_bound_the_shapes_and_overflow_is_counted(caplog):
    buckets = batching.make_buckets((), 96, 32)
    assert len(buckets) == 9 and buckets[0] == (32, 32)
    coco = batching.make_buckets((), 1333, 128)  # sides 128..1280 and 1333 rounded up to 32
    assert len(coco) == 11 * 11 and coco[-1] == (1344, 1344) and (1280, 1344) in coco
    assert batching.choose_bucket(buckets, 40, 90, 32) == ((64, 96), False)
    assert batching.choose_bucket(buckets, 97, 10, 32) == ((128, 32), True)
    explicit = batching.make_buckets([(64, 128), (128, 64), (96, 96)], 0, 32)
    assert batching.choose_bucket(explicit, 90, 60, 32) == ((128, 64), False)

    data = _tiny_data(bucket_shapes=((48, 48),))
    it = _train(data)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            next(it)
    assert it.stats.bucket_overflows == 3 and it.stats.batches == 3
    # the warning names the images that fit no bucket, with their resized size
    assert re.search(r"fit no bucket; padded to .*: synthetic train\[\d+\] \(h=\d+, w=\d+\)", caplog.text)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in it.stats.batch_shapes)
    stats = _train(_tiny_data())
    for _ in range(6):
        next(stats)
    assert 1 <= stats.stats.as_dict()["distinct_shapes"] <= len(buckets)


def _plain_example(name, height, width):
    return {
        "image": np.zeros((height, width, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32), "image_id": 0, "orig_size": (height, width), "is_real": True,
        "name": name, "skipped_files": (), "num_degenerate": 0,
    }


def test_collate_names_the_images_that_overflow():
    buckets = batching.make_buckets([(64, 128), (128, 64)], 0, 32)
    fits = batching.collate([_plain_example("a.jpg", 60, 100)], buckets, 2, 32)[batching.STATS_KEY]
    assert fits["bucket_overflows"] == 0 and fits["overflow_images"] == ()
    stats = batching.collate(
        [_plain_example("a.jpg", 60, 100), _plain_example("big.jpg", 129, 20)], buckets, 2, 32
    )[batching.STATS_KEY]
    assert stats["bucket_overflows"] == 1 and stats["overflow_images"] == ("big.jpg (h=129, w=20)",)
    together = batching.collate(  # each fits a bucket, the two together (100x100) do not
        [_plain_example("a.jpg", 60, 100), _plain_example("b.jpg", 100, 40)], buckets, 2, 32
    )[batching.STATS_KEY]
    assert together["bucket_overflows"] == 1 and together["overflow_images"] == ()


def test_shape_sync_repads_to_the_agreed_shape():
    data = _tiny_data()
    plain = next(_train(data))
    synced = next(_train(data, shape_sync=lambda batch: (128, 160)))
    assert synced["image"].shape[1:3] == (128, 160) and synced["mask"].shape[1:] == (128, 160)
    h, w = plain["image"].shape[1:3]
    np.testing.assert_array_equal(synced["image"][:, :h, :w], plain["image"])
    assert synced["mask"].sum() == plain["mask"].sum()
    with pytest.raises(ValueError, match="cannot repad"):
        batching.repad(plain, (16, 16))


def test_worker_processes_give_the_same_batches_and_resume():
    data, with_workers = _tiny_data(), _tiny_data(num_workers=2, num_threads=1)
    in_process = _train(data, seed=5)
    expected = [next(in_process) for _ in range(4)]
    workers = _train(with_workers, seed=5)
    try:
        for batch in expected[:2]:
            _assert_same_batch(batch, next(workers))
        state = json.loads(json.dumps(workers.get_state()))
        _assert_same_batch(expected[2], next(workers))
        assert workers.stats.batches == 3
    finally:
        workers.close()
    resumed = _train(with_workers, seed=5)
    try:
        resumed.set_state(state)
        for batch in expected[2:]:
            _assert_same_batch(batch, next(resumed))
    finally:
        resumed.close()


def test_threads_give_the_same_batches():
    plain, threaded = _train(_tiny_data()), _train(_tiny_data(num_threads=3, prefetch_batches=3))
    for _ in range(3):
        _assert_same_batch(next(plain), next(threaded))


def test_sizes_and_steps():
    data = _tiny_data()
    assert num_examples(data, "train") == 12 and num_examples(data, "eval") == 7
    assert steps_per_epoch(12, 4) == 3 and steps_per_epoch(3, 4) == 1
    with pytest.raises(ValueError, match="multiple of 2 hosts"):
        _train(data, batch_size=3, shard_count=2)


def test_tfds_pipeline_end_to_end():
    tfds = pytest.importorskip("tensorflow_datasets")
    data = _tiny_data(dataset="tfds", tfds_name="coco/2017", max_boxes=100)
    with tfds.testing.mock_data(num_examples=4):
        it = _train(data, batch_size=2)
        batch = next(it)
    valid = batch["valid"]
    assert valid.sum() > 0 and batch["is_real"].all()
    assert batch["labels"][valid].min() >= 1 and batch["labels"][valid].max() <= 90
    assert np.all(batch["boxes"][valid][:, 2:] > 0)


@pytest.mark.parametrize(
    "key,value",
    [("dataset", "imagenet"), ("max_boxes", 0), ("hflip_prob", 1.5), ("crop_size", (600, 384)),
     ("bucket_shapes", ((64,),)), ("tfds_label_mapping", "ids")],
)
def test_invalid_data_config_is_rejected(key, value):
    data = _tiny_data()
    data[key] = value
    with pytest.raises(ConfigError, match=f"data.{key}"):
        validate(data)


_TWO_HOST_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from detr_jax.data import make_eval_iterator, make_train_iterator
from detr_jax.data.config import data_config
data = data_config()
data.update(json.loads(sys.argv[3]))
train = make_train_iterator(data, 4, seed=0)  # shards and shape sync from jax
batches = [next(train) for _ in range(6)]
evals = list(make_eval_iterator(data, 4))
print(json.dumps({
    "train_shapes": [b["image"].shape[1:3] for b in batches],
    "train_ids": [b["image_id"].tolist() for b in batches[:3]],
    "eval_shapes": [b["image"].shape[1:3] for b in evals],
    "eval_ids": [b["image_id"][b["is_real"]].tolist() for b in evals],
}))
"""


def test_two_processes_agree_on_padded_shapes(tmp_path):
    """Real jax.distributed run on CPU: shapes must match across hosts (else the step hangs)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(_TWO_HOST_SCRIPT)
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in _tiny_data().items()}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i), json.dumps(overrides)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    host0, host1 = outputs
    assert host0["train_shapes"] == host1["train_shapes"]
    assert host0["eval_shapes"] == host1["eval_shapes"]
    epoch = sum(host0["train_ids"], []) + sum(host1["train_ids"], [])
    assert sorted(epoch) == list(range(12))
    assert sorted(sum(host0["eval_ids"], []) + sum(host1["eval_ids"], [])) == list(range(7))

"""`detr-jax analyze`: what a checkpoint's object queries and attention learned, as
pictures, tables and a report page (`detr_jax.analysis.analyze`)."""

from __future__ import annotations

import pathlib

from detr_jax.analysis import analyze
from detr_jax.cli.common import DTYPE_CHOICES, checkpoint_command_config, nonnegative_int, positive_int, probability
from detr_jax.checkpoints.restore import load_checkpoint


def add_parser(sub) -> None:
    parser = sub.add_parser("analyze", help="what the object queries and attention learned: pictures and a report")
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint")
    parser.add_argument("--out", required=True, help="output folder (index.html, PNGs, JSON, CSV)")
    parser.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="dataset split to run on")
    parser.add_argument("--max_images", type=positive_int, default=None, help="analyze the first N images")
    parser.add_argument("--score_threshold", type=probability, default=0.7,
                        help="confident predictions score at least this")
    parser.add_argument("--attention_images", type=nonnegative_int, default=8, help="images to draw attention maps of")
    parser.add_argument("--encoder_layer", type=int, default=-1, help="encoder layer of the attention maps")
    parser.add_argument("--decoder_layer", type=int, default=-1, help="decoder layer of the attention maps")
    parser.add_argument("--grid", type=positive_int, default=4, help="location cells per side")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="images per compiled batch")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args, overrides: dict[str, str]) -> int:
    config, overrides = checkpoint_command_config(args, overrides)
    variables, config = load_checkpoint(args.checkpoint, config, overrides)
    stats = analyze(
        variables, config, args.out, split=args.split, max_images=args.max_images,
        score_threshold=args.score_threshold, attention_images=args.attention_images, batch_size=args.batch_size,
        dtype=args.dtype, encoder_layer=args.encoder_layer, decoder_layer=args.decoder_layer, grid=args.grid,
        progress=not args.no_progress, description={"checkpoint": str(args.checkpoint)})
    location = stats.specialization["confident"]["location"]
    print(f"analyzed {stats.settings['num_images']} image(s), {stats.settings['num_slots']} query slots: "
          f"slot-location MI {location['mi_bits']:.3f} bits (shuffled slots {location['baseline_mi_bits']:.3f}); "
          f"report: {pathlib.Path(args.out) / 'index.html'}")
    return 0

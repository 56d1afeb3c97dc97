"""Writes tests/fixtures/dino_tiny.npz: a tiny random-weight official DINO, its inputs,
denoising draws, outputs and losses, for tests/test_parity_dino.py.

    git --git-dir=<mirror of IDEA-Research/DINO> archive HEAD | tar -x -C /tmp/dino
    python scripts/make_dino_fixture.py /tmp/dino [--out tests/fixtures/dino_tiny.npz]

Runs the official code (IDEA-Research/DINO models/dino: dino.py, deformable_transformer.py,
dn_components.py, matcher.py, backbone.py, position_encoding.py) on the CPU with torch only.
What is stubbed or patched, and why:
  - the compiled MultiScaleDeformableAttention extension: MSDeformAttnFunction is replaced by
    the repository's own pure PyTorch path `ms_deform_attn_core_pytorch`;
  - torchvision (not needed otherwise; util.misc and util.box_ops import it): a stub with
    `ops.boxes.box_area` (torchvision's formula), `nms` (unused) and
    `models._utils.IntermediateLayerGetter` (torchvision's, in a few lines); timm, which
    only the Swin and ConvNeXt backbones import, is not needed (those modules are stubbed);
  - the backbone: torchvision's ResNet structure (the names `backbone.0.body.conv1`,
    `layer1.0.downsample.0`, ...; stride in the 3x3 conv) with our `resnet_tiny` widths
    (stem 16, inner widths 8/16/32/64, one bottleneck per stage, FrozenBatchNorm2d), in
    the official `BackboneBase` and `Joiner`;
  - `.cuda()` / `.to("cuda")`, which the denoising code and criterion call: no-ops;
  - `gen_sineembed_for_position` hard-codes 128 features per coordinate (E = 256); the tiny
    model (E = 32) uses the same function with E / 2 features (identical at E = 256);
  - the denoising draws (`torch.rand_like`, `torch.randint_like` in prepare_for_cdn) return
    the arrays stored in the fixture, reordered from our slot layout ([B, 2 * M * G],
    slot r * M + m for copy r of target m) to the official flat one (copy r, then the
    targets of every image in order), new labels taken at the flipped slots.
Weights are random (every tensor, FrozenBN statistics included), rounded to float16 so that
the fixture stores them as float16 without loss.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import types

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
MAX_BOXES = 3  # = the batch's largest target count: the official groups and ours coincide
SIZES = [(64, 64), (48, 56)]  # padded to 64x64
DN_NUMBER = 50  # official: 2 * 50 >= 100 -> 100 // (2 * 3) = 16 groups; ours: 50 // 3 = 16
TINY = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10,
            enc_n_points=2, dec_n_points=2)
RESNET = dict(stem=16, widths=(8, 16, 32, 64))


def stub_modules() -> None:
    """torchvision, the compiled extension and the timm-based backbones (module docstring)."""
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.15.0"
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    boxes.nms = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("nms"))
    ops.boxes = boxes
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models._utils")

    class IntermediateLayerGetter(torch.nn.ModuleDict):
        def __init__(self, model, return_layers):
            layers, wanted = {}, dict(return_layers)
            for name, child in model.named_children():
                layers[name] = child
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x):
            out = {}
            for name, child in self.items():
                x = child(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    utils.IntermediateLayerGetter = IntermediateLayerGetter
    models._utils = utils
    tv.ops, tv.models = ops, models
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
                        "torchvision.models": models, "torchvision.models._utils": utils,
                        "MultiScaleDeformableAttention": types.ModuleType("MultiScaleDeformableAttention")})
    for name, builder in (("models.dino.convnext", "build_convnext"),
                          ("models.dino.swin_transformer", "build_swin_transformer")):
        stub = types.ModuleType(name)
        setattr(stub, builder, None)
        sys.modules[name] = stub


def tiny_resnet(frozen_bn):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..4 of Bottlenecks with
    the stride in conv2) at resnet_tiny's widths."""
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, width, stride):
            super().__init__()
            out = width * 4
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = frozen_bn(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = frozen_bn(width)
            self.conv3 = nn.Conv2d(width, out, 1, bias=False)
            self.bn3 = frozen_bn(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), frozen_bn(out))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + self.downsample(x))

    body = nn.Module()
    body.conv1 = nn.Conv2d(3, RESNET["stem"], 7, 2, 3, bias=False)
    body.bn1 = frozen_bn(RESNET["stem"])
    body.relu = nn.ReLU(inplace=True)
    body.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = RESNET["stem"]
    for i, width in enumerate(RESNET["widths"]):
        setattr(body, f"layer{i + 1}", nn.Sequential(Bottleneck(inplanes, width, 1 if i == 0 else 2)))
        inplanes = width * 4
    return body


def official_args(dino_root: pathlib.Path) -> types.SimpleNamespace:
    """config/DINO/coco_transformer.py + DINO_4scale.py, the training scripts' options, the
    tiny sizes."""
    values: dict = {}
    for name in ("coco_transformer.py", "DINO_4scale.py"):
        exec((dino_root / "config" / "DINO" / name).read_text(), {}, values)
    values.update(dn_scalar=100, embed_init_tgt=True, dn_label_coef=1.0, dn_bbox_coef=1.0, use_ema=False,
                  dn_box_noise_scale=1.0)
    values.update(TINY, num_classes=NUM_CLASSES, dn_labelbook_size=NUM_CLASSES, dn_number=DN_NUMBER, device="cpu")
    return types.SimpleNamespace(**values)


def draws(rng, num_dn: int) -> dict[str, np.ndarray]:
    """Our DenoisingNoise fields [B, Qdn(, 4)]."""
    batch = len(SIZES)
    return {"label_uniform": rng.random((batch, num_dn), dtype=np.float32),
            "new_labels": rng.integers(0, NUM_CLASSES, (batch, num_dn)).astype(np.int32),
            "box_sign": np.where(rng.random((batch, num_dn, 4)) < 0.5, -1.0, 1.0).astype(np.float32),
            "box_part": rng.random((batch, num_dn, 4), dtype=np.float32)}


def official_draws(noise: dict, counts: list[int], copies: int):
    """Our per-slot draws in the official flat order: index r * N + offset_b + m (N the total
    target count) for copy r of target m of image b."""
    order = [(b, r * MAX_BOXES + m) for r in range(copies) for b, n in enumerate(counts) for m in range(n)]
    rows, cols = np.array([o[0] for o in order]), np.array([o[1] for o in order])
    return {k: torch.from_numpy(np.ascontiguousarray(v[rows, cols])) for k, v in noise.items()}


def randomize_(model, generator) -> None:
    """Random weights everywhere (module docstring), float16-exact."""
    with torch.no_grad():
        for name, tensor in list(model.state_dict(keep_vars=True).items()):
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.5)
            elif "running_mean" in name or name.endswith("bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
            elif tensor.ndim == 1:  # norm scales
                tensor.copy_(1 + torch.randn(tensor.shape, generator=generator) * 0.2)
            elif tensor.ndim == 4:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            elif "embed" in name.split(".")[-2] or name.endswith(("level_embed", "tgt_embed.weight")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:
                bound = math.sqrt(3.0 / tensor.shape[-1])
                tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
            tensor.copy_(tensor.half().float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dino_root", type=pathlib.Path, help="an extracted IDEA-Research/DINO tree")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "tests" / "fixtures" / "dino_tiny.npz")
    options = parser.parse_args()
    root = options.dino_root.resolve()
    sys.path.insert(0, str(root))
    stub_modules()
    torch.Tensor.cuda = lambda self, *a, **k: self
    original_to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: self if a and a[0] == "cuda" else original_to(self, *a, **k)

    from models.dino import backbone as backbone_module, deformable_transformer, dino, dn_components
    from models.dino.ops.functions import ms_deform_attn_func
    from models.dino.ops.modules import ms_deform_attn
    from models.dino.position_encoding import build_position_encoding

    class PurePyTorch:
        @staticmethod
        def apply(value, shapes, level_start_index, locations, weights, im2col_step):
            return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PurePyTorch
    official_sine = deformable_transformer.gen_sineembed_for_position
    feats = TINY["hidden_dim"] // 2

    def sine(pos_tensor):  # official with 128 -> E / 2 (module docstring)
        scale = 2 * math.pi
        dim_t = torch.arange(feats, dtype=torch.float32)
        dim_t = 10000 ** (2 * (dim_t // 2) / feats)
        embeds = []
        for i in (1, 0, 2, 3)[:pos_tensor.size(-1)]:
            p = pos_tensor[:, :, i][:, :, None] * scale / dim_t
            embeds.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
        return torch.cat(embeds, dim=2)

    check = torch.rand(3, 2, 4)
    feats, saved = 128, feats
    torch.testing.assert_close(sine(check), official_sine(check), rtol=0, atol=0)  # the same function at E = 256
    feats = saved
    deformable_transformer.gen_sineembed_for_position = sine

    args = official_args(root)
    joiner = backbone_module.Joiner(
        backbone_module.BackboneBase(tiny_resnet(backbone_module.FrozenBatchNorm2d), True,
                                     [w * 4 for w in RESNET["widths"][1:]], [1, 2, 3]),
        build_position_encoding(args))
    joiner.num_channels = joiner[0].num_channels
    dino.build_backbone = lambda a: joiner
    torch.manual_seed(0)
    model, criterion, _ = dino.build_dino(args)
    generator = torch.Generator().manual_seed(0)
    randomize_(model, generator)

    rng = np.random.default_rng(0)
    height, width = max(s[0] for s in SIZES), max(s[1] for s in SIZES)
    images = np.zeros((len(SIZES), height, width, 3), np.float32)
    mask = np.zeros((len(SIZES), height, width), bool)
    for i, (h, w) in enumerate(SIZES):
        images[i, :h, :w] = rng.normal(0, 1, (h, w, 3))
        mask[i, :h, :w] = True
    images = images.astype(np.float16).astype(np.float32)
    counts = [3, 2]
    labels = np.zeros((len(SIZES), MAX_BOXES), np.int32)
    boxes = np.full((len(SIZES), MAX_BOXES, 4), 0.5, np.float32)
    valid = np.zeros((len(SIZES), MAX_BOXES), bool)
    for b, n in enumerate(counts):
        labels[b, :n] = rng.integers(0, NUM_CLASSES, n)
        centre = rng.uniform(0.25, 0.75, (n, 2))
        size = rng.uniform(0.1, 0.4, (n, 2))
        boxes[b, :n] = np.concatenate([centre, size], -1)
        valid[b, :n] = True
    targets = [{"labels": torch.from_numpy(labels[b, :n]).long(), "boxes": torch.from_numpy(boxes[b, :n])}
               for b, n in enumerate(counts)]
    groups = max(1, DN_NUMBER // MAX_BOXES)
    num_dn = 2 * MAX_BOXES * groups
    noise = draws(rng, num_dn)
    flat = official_draws(noise, counts, 2 * groups)

    samples = dino.NestedTensor(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(~mask))
    result = {"images": images.astype(np.float16), "mask": mask, "labels": labels, "boxes": boxes, "valid": valid,
              **{f"noise_{k}": v for k, v in noise.items()}}
    for k, v in model.state_dict().items():
        array = v.numpy()
        result[f"weight:{k}"] = array.astype(np.float16) if array.dtype == np.float32 else array

    def per_layer(out):
        logits = torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
        boxes_ = torch.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]])
        return logits.detach().numpy(), boxes_.detach().numpy()

    def losses(out, prefix):
        loss_dict = criterion(out, targets)
        weights = criterion.weight_dict
        total = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        result[f"{prefix}loss"] = np.float64(total.item())
        for k, v in loss_dict.items():
            if k.startswith("loss") and k.replace("_interm", "") .split("_")[1] in ("ce", "bbox", "giou"):
                result[f"{prefix}loss:{k}"] = np.float64(v.item())

    # Denoising off: eval mode, no targets.
    model.eval()
    with torch.no_grad():
        out = model(samples)
    result["off_logits"], result["off_boxes"] = per_layer(out)
    result["off_enc_logits"] = out["interm_outputs"]["pred_logits"].numpy()
    result["off_enc_boxes"] = out["interm_outputs"]["pred_boxes"].numpy()
    losses(out, "off_")

    # Denoising on: training mode (dropout 0), the stored draws.
    calls = []

    def rand_like(x, *a, **k):
        calls.append("rand_like")
        if x.ndim == 1:
            assert x.shape == flat["label_uniform"].shape
            return flat["label_uniform"].clone()
        assert x.shape == flat["box_part"].shape
        return flat["box_part"].clone()

    def randint_like(x, low=0, high=None, dtype=None, **k):
        calls.append("randint_like")
        if x.ndim == 1:  # the flipped slots' new labels
            chosen = torch.nonzero(flat["label_uniform"] < args.dn_label_noise_ratio * 0.5).view(-1)
            assert x.shape == chosen.shape and high == NUM_CLASSES
            return flat["new_labels"][chosen].to(x.dtype)
        assert x.shape == flat["box_sign"].shape and (low, high) == (0, 2)
        return (flat["box_sign"] + 1) / 2

    dn_components.torch = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    dn_components.torch.rand_like, dn_components.torch.randint_like = rand_like, randint_like
    model.train()
    with torch.no_grad():
        out = model(samples, targets)
    assert calls == ["rand_like", "randint_like", "randint_like", "rand_like"], calls
    meta = out["dn_meta"]
    assert meta["pad_size"] == num_dn and meta["num_dn_group"] == groups, meta
    result["on_logits"], result["on_boxes"] = per_layer(out)
    known = meta["output_known_lbs_bboxes"]
    result["on_dn_logits"], result["on_dn_boxes"] = per_layer(known)
    result["on_enc_logits"] = out["interm_outputs"]["pred_logits"].numpy()
    result["on_enc_boxes"] = out["interm_outputs"]["pred_boxes"].numpy()
    losses(out, "on_")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(options.out, **result)
    print(f"wrote {options.out} ({options.out.stat().st_size / 1e3:.0f} kB): {len(result)} arrays")


if __name__ == "__main__":
    main()

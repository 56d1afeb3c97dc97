"""Reading PyTorch checkpoint files (.pth/.pt/.bin, .safetensors, a Hugging Face model
directory) as numpy state dicts, safely."""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import pickle
import re
import zipfile
from typing import Mapping

import numpy as np

from detr_jax.convert.errors import ConversionError


def checkpoint_file(path: pathlib.Path) -> pathlib.Path:
    """The weights file of `path`, a file or a Hugging Face model directory."""
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise ConversionError(f"{path}: directory holds neither model.safetensors nor pytorch_model.bin")
    return path


def _to_numpy(value) -> np.ndarray | None:
    import torch  # an optional extra (detr-jax[torch]), imported only to read a PyTorch file

    if not isinstance(value, torch.Tensor):
        return None
    if value.is_floating_point():
        return value.detach().to(torch.float32).cpu().numpy()
    return value.detach().cpu().numpy()


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint (.pth/.pt/.bin via torch.load, or .safetensors) as numpy.

    Unwraps {"model": ...} (official DETR) and {"state_dict": ...}, strips a DataParallel
    "module." prefix. Floating tensors become float32. Needs torch (`pip install
    detr-jax[torch]`). Loading never runs code from the file (`weights_only=True`): a file
    that is not a PyTorch checkpoint, or holds objects only a full unpickle would load, is
    refused with a ConversionError saying so.
    """
    path = checkpoint_file(pathlib.Path(path))
    try:  # torch and safetensors are an optional extra (detr-jax[torch]), needed only here
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading PyTorch checkpoints needs torch (pip install 'detr-jax[torch]')") from e
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            # Official DETR training checkpoints also store their argparse arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, zip, runtime); name the file
        # torch's weights-only refusal advises weights_only=False, i.e. unpickling whatever
        # the file holds (arbitrary code): say what the file is instead, never pass that on.
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise _refused(path, e) from None
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    state_dict, not_tensors = {}, []
    for key, value in raw.items():
        array = _to_numpy(value)
        if array is None:
            not_tensors.append(f"{key} ({type(value).__name__})")
        else:
            state_dict[key] = array
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(not_tensors)}")
    return state_dict


def _refused(path: pathlib.Path, error: Exception) -> ConversionError:
    """Why torch's weights-only load refused `path`: not a checkpoint, or not a safe one."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not (zipfile.is_zipfile(path) or head.startswith(b"\x80")):  # torch.save: a zip, or (legacy) a pickle
        return ConversionError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle "
            f"(it starts with {head!r})"
        )
    needed = re.search(r"GLOBAL ([\w.]+)", str(error))
    if needed:
        return ConversionError(
            f"{path}: not a safe PyTorch checkpoint: it needs {needed[1]}, which a weights-only load "
            "refuses (unpickling it could run arbitrary code); convert a file that holds only "
            "tensors, such as a saved model.state_dict()"
        )
    return ConversionError(
        f"{path}: not a PyTorch checkpoint, or not a safe one: a weights-only load (which runs no "
        "code from the file) cannot read it"
    )


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

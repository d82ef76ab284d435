"""Converting a checkpoint on local disk into a model directory: :func:`convert` and the command line
(``python -m ddim_jax.convert``, see :mod:`ddim_jax.convert`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ddim_jax import models
from ddim_jax.convert.clip_text import sd_tokenizer
from ddim_jax.convert.common import find_diffusers_weights, read_json
from ddim_jax.convert.ddim import convert_ddim
from ddim_jax.convert.diffusers_unet import diffusers_spec
from ddim_jax.convert.export import EXPORT_FORMATS, export_diffusers
from ddim_jax.convert.kinds import converter
from ddim_jax.convert.scheduler import find_scheduler_config
from ddim_jax.convert.stable_diffusion import convert_stable_diffusion, is_sd_folder
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError, read_state_dict
from ddim_jax.unet import count_params

FORMATS = ("auto", "diffusers", "ddim", "stable_diffusion")
TARGETS = ("ddim_jax",) + EXPORT_FORMATS  # --to: a model directory (importing), or a diffusers folder (exporting)


def _detect_format(src: str) -> tuple[str, tuple[dict, str | None] | None]:
    """The format of ``src``, and for a file the (state dict, note) already read to find it."""
    if os.path.isdir(src):
        if any(os.path.isfile(os.path.join(d, "config.json")) for d in (src, os.path.join(src, "unet"))):
            return "diffusers", None
        raise ConversionError(f"cannot tell the format of directory {src}: no config.json (diffusers) found; "
                              "pass the weights file for the ddim format")
    loaded = read_state_dict(src)
    if "time_embedding.linear_1.weight" in loaded[0]:
        return "diffusers", loaded
    if "temb.dense.0.weight" in loaded[0]:
        return "ddim", loaded
    raise ConversionError(f"unrecognised checkpoint format in {src}: neither diffusers UNet2DModel keys "
                          "(time_embedding.linear_1.weight) nor ermongroup/ddim keys (temb.dense.0.weight); "
                          "pass --format")


def _check_destination(dst: str, overwrite: bool) -> None:
    """Fails early (before reading any weights) where :func:`ddim_jax.models.save` would refuse ``dst``.

    Nothing is deleted here: models.save swaps the new model directory in and only then removes the old one.
    """
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise FileExistsError(f"destination exists: {dst} (pass --overwrite / overwrite=True to replace it)")
    if not (os.path.isdir(dst) and (models.is_model_dir(dst) or not os.listdir(dst))):
        raise FileExistsError(f"destination exists and is not a model directory ({models.SPEC_FILE}); "
                              f"refusing to replace it: {dst}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "auto", overwrite: bool = False,
            image_size: int | None = None) -> ModelSpec:
    """Convert the checkpoint at ``src`` into the model directory ``dst``; returns the spec written.

    ``dst`` is written by :func:`ddim_jax.models.save`: an existing ``dst`` is replaced only with
    ``overwrite``, only if it is a model directory (or empty), and only once the new one is complete, so a
    failed conversion leaves it as it was. Load the result with :func:`ddim_jax.models.load`.
    """
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}: choose {', '.join(FORMATS)}")
    _check_destination(dst, overwrite)
    loaded = None
    if fmt == "auto" and os.path.isdir(src) and is_sd_folder(src):
        fmt = "stable_diffusion"
    if fmt == "auto":
        fmt, loaded = _detect_format(src)
    source = {"path": src, "format": fmt, "entry": None}
    tokenizer = None
    if fmt == "stable_diffusion":
        if not os.path.isdir(src):
            raise ConversionError(f"stable_diffusion format needs a folder (unet/, vae/, scheduler/), not a file: "
                                  f"{src}")
        spec, params = convert_stable_diffusion(src)
        tokenizer = None if spec.text_encoder is None else sd_tokenizer(src)
    elif fmt == "diffusers":
        weights, config_dir = find_diffusers_weights(src)
        config_path = os.path.join(config_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"diffusers format needs config.json beside the weights: {config_path} not found")
        unet_config = read_json(config_path)
        scheduler_path = find_scheduler_config(config_dir)
        scheduler_config = None if scheduler_path is None else read_json(scheduler_path)
        spec = diffusers_spec(unet_config, image_size, scheduler_config, config_path, scheduler_path)
        sd, _ = loaded or read_state_dict(weights)
        params = converter(spec.kind).to_params(sd, spec)
    else:
        if os.path.isdir(src):
            raise ConversionError(f"ddim format needs a weights file, got a directory: {src}")
        sd, source["entry"] = loaded or read_state_dict(src)
        spec, params = convert_ddim(sd, image_size)
    spec = dataclasses.replace(spec, info={"source": source})
    models.save(dst, spec, params, overwrite=overwrite, tokenizer=tokenizer)
    return spec


def _describe(spec: ModelSpec) -> str:
    """The spec as one line of JSON, a custom schedule's betas abbreviated."""
    d = spec.to_dict()
    if "betas" in d["schedule"]:
        d["schedule"]["betas"] = f"<{len(d['schedule']['betas'])} values>"
    return json.dumps(d, sort_keys=True)


def _export(args) -> int:
    given = [f for f, v in (("--format", args.format != "auto"), ("--image-size", args.image_size is not None)) if v]
    if given:
        print(f"error: {given[0]} applies to importing; --to {args.to} takes a model directory as it is",
              file=sys.stderr)
        return 2
    try:
        cls = export_diffusers(args.src, args.dst, args.overwrite)
    except (ConversionError, FloatingPointError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported model directory {os.path.abspath(args.src)} -> {os.path.abspath(args.dst)}: diffusers {cls}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddim_jax.convert",
                                     description="Convert a DDPM/DDIM PyTorch checkpoint (local files) to a "
                                                 "ddim_jax model directory, or (--to diffusers) a model directory "
                                                 "to a diffusers folder.")
    parser.add_argument("src", help="diffusers UNet2DModel directory / weights file, a diffusers Stable Diffusion "
                                    "folder (unet/, vae/, scheduler/, and text_encoder/ with tokenizer/), or an "
                                    "ermongroup/ddim .ckpt/.pth; with --to diffusers, a model directory")
    parser.add_argument("dst", help=f"output model directory ({models.SPEC_FILE} + {models.PARAMS_FILE}); with --to "
                                    "diffusers, the diffusers folder")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="the source's format (importing)")
    parser.add_argument("--to", default="ddim_jax", choices=TARGETS,
                        help="ddim_jax: SRC is a checkpoint, DST a model directory; diffusers: SRC is a model "
                             "directory, DST the diffusers folder written from it (safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing model directory (--to diffusers: an exported folder) at DST")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training image size (default: diffusers sample_size; ddim: 16 px at the first "
                             "attention level)")
    args = parser.parse_args(argv)
    if args.to != "ddim_jax":
        return _export(args)
    try:
        spec = convert(args.src, args.dst, args.format, args.overwrite, args.image_size)
    except (ConversionError, FloatingPointError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = count_params(spec.param_shapes())
    print(f"converted {spec.info['source']['format']} checkpoint {spec.info['source']['path']} -> "
          f"{os.path.abspath(args.dst)}: {n:,} params")
    print(f"spec: {_describe(spec)}")
    return 0

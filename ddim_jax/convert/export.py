"""Model directories back to the PyTorch ecosystem: :func:`export_diffusers` writes a diffusers folder
(``python -m ddim_jax.convert --to diffusers MODEL_DIR OUT``).

What a model directory becomes:

- a pixel ``unet`` model: a ``DDIMPipeline`` folder, ``unet/`` (a ``UNet2DModel``) and ``scheduler/`` (a
  ``DDIMScheduler`` with the model's schedule and prediction type), with ``model_index.json``;
- a latent ``unet2d_condition`` model over an ``autoencoder_kl`` (a converted Stable Diffusion model): a
  ``StableDiffusionPipeline`` folder (``StableDiffusionInpaintPipeline`` for an inpainting UNet), ``unet/``,
  ``vae/`` (its ``scaling_factor`` the model's ``scale_factor``), ``scheduler/``, and ``text_encoder/`` (a
  transformers ``CLIPTextModel``) with ``tokenizer/`` when it has them;
- an ``autoencoder_kl`` / ``autoencoder_vq`` model: an ``AutoencoderKL`` / ``VQModel`` folder; a ``clip_text``
  model: a transformers ``CLIPTextModel`` folder.

Each network's config and weights come from its kind's entry in :data:`ddim_jax.convert.kinds.CONVERTERS`
(weights in torch's layout, as safetensors). What has no diffusers counterpart (a kind, or a field such as a
latent ``unet``'s autoencoder, a concat condition other than inpainting's, ``clip_skip``) is refused in one
line, as are non-finite params, before anything is written; ``OUT`` is written as the importer writes a model
directory: into a temporary folder swapped in when complete, an existing one replaced only with
``overwrite`` and only if it holds nothing but an export's files.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ddim_jax import files, models
from ddim_jax import tokenizer as tokenizer_lib
from ddim_jax.convert.common import DIFFUSERS_VERSION
from ddim_jax.convert.kinds import converter, network_spec
from ddim_jax.convert.scheduler import scheduler_config
from ddim_jax.models import ModelSpec
from ddim_jax.state_dicts import ConversionError

EXPORT_FORMATS = ("diffusers",)
MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# What an export writes: the top-level entries of its folder, and the files in its parts' folders.
_PARTS = ("unet", "vae", "scheduler", "text_encoder", models.TOKENIZER_DIR)
_PART_FILES = {CONFIG, SCHEDULER_CONFIG, "diffusion_pytorch_model.safetensors", "model.safetensors",
               *tokenizer_lib.FILES}


def _holds_only_an_export(path: str) -> bool:
    """A diffusers folder holding nothing but what an export writes (only such a folder is ever replaced)."""
    names = set(os.listdir(path))
    if not names & {MODEL_INDEX, CONFIG} or not names <= {MODEL_INDEX, *_PART_FILES, *_PARTS}:
        return False
    for name in names & set(_PARTS):
        part = os.path.join(path, name)
        if os.path.islink(part) or not os.path.isdir(part) or not set(os.listdir(part)) <= _PART_FILES:
            return False
    return True


def check_destination(out: str, overwrite: bool) -> None:
    """Fails early (before reading any weights) where the export would refuse ``out``."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"destination exists: {out} (pass --overwrite / overwrite=True to replace it)")
    if not (os.path.isdir(out) and (not os.listdir(out) or _holds_only_an_export(out))):
        raise FileExistsError(f"destination exists and is not a diffusers folder written by an export "
                              f"({MODEL_INDEX} or {CONFIG} and its parts only); refusing to replace it: {out}")


def _network(spec: ModelSpec, params) -> tuple[dict, dict[str, np.ndarray] | None, str]:
    """(config, state dict, weights file name) of one network through its kind's entry (``params`` None: no
    state dict, the config alone)."""
    entry = converter(spec.kind)
    config = entry.write_config(spec)
    return config, None if params is None else entry.from_params(network_spec(spec), params), entry.weights


def _parts(spec: ModelSpec, params, tokenizer) -> tuple[str, dict[str, tuple], dict | None]:
    """The class diffusers loads the folder with, its parts ``{folder: (config file, config, state dict, weights
    file)}`` (``""``: the folder itself) and its ``model_index.json`` (None for one network's folder). With
    ``params`` None, the configs alone: every refusal that needs no weights happens here."""
    sub = (lambda name: None) if params is None else params.__getitem__
    if not spec.is_diffusion:  # one network: its class's folder
        config, sd, weights = _network(spec, params)
        return converter(spec.kind).class_name, {"": (CONFIG, config, sd, weights)}, None
    converter(spec.kind)  # a kind without a counterpart is refused here, naming it
    if spec.kind == "unet":  # its config writer refuses a latent one, naming the autoencoder
        config, sd, weights = _network(spec, params)
        parts = {"unet": (CONFIG, config, sd, weights),
                 "scheduler": (SCHEDULER_CONFIG, scheduler_config(spec), None, None)}
        return "DDIMPipeline", parts, _model_index("DDIMPipeline", parts, False)
    if spec.kind != "unet2d_condition":
        raise ConversionError(f"a {spec.kind} diffusion model has no diffusers pipeline counterpart (diffusers' "
                              "pipelines here: a UNet2DModel's DDIMPipeline, Stable Diffusion's)")
    if spec.autoencoder is None or spec.autoencoder.kind != "autoencoder_kl":
        raise ConversionError(f"a unet2d_condition model with autoencoder "
                              f"{None if spec.autoencoder is None else spec.autoencoder.kind} has no diffusers "
                              "pipeline counterpart (Stable Diffusion's vae is an autoencoder_kl, an AutoencoderKL)")
    if spec.clip_skip:
        raise ConversionError(f"clip_skip={spec.clip_skip} has no counterpart in a diffusers folder (diffusers takes "
                              "clip_skip when the pipeline is called); export a model with clip_skip 0")
    if spec.text_encoder is not None and tokenizer is None:
        raise ConversionError("the model has a text encoder but no tokenizer/ (a Stable Diffusion folder holds both)")
    config, sd, weights = _network(spec, sub("denoiser"))
    parts = {"unet": (CONFIG, config, sd, weights)}
    config, sd, weights = _network(spec.autoencoder, sub("autoencoder"))
    parts["vae"] = (CONFIG, {**config, "scaling_factor": spec.scale_factor}, sd, weights)
    parts["scheduler"] = (SCHEDULER_CONFIG, scheduler_config(spec), None, None)
    if spec.text_encoder is not None:
        config, sd, weights = _network(spec.text_encoder, sub("text_encoder"))
        config.update(bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)  # transformers reads them here
        parts["text_encoder"] = (CONFIG, config, sd, weights)
    cls = "StableDiffusionInpaintPipeline" if spec.concat == "sd_inpaint" else "StableDiffusionPipeline"
    return cls, parts, _model_index(cls, parts, spec.text_encoder is not None)


def _model_index(cls: str, parts: dict, has_text: bool) -> dict:
    index = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION}
    for name, (_, config, _, _) in parts.items():
        library = "transformers" if name == "text_encoder" else "diffusers"
        index[name] = [library, config["architectures"][0] if "architectures" in config else config["_class_name"]]
    if cls != "DDIMPipeline":
        index.update(feature_extractor=[None, None], safety_checker=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False,
                     tokenizer=["transformers", "CLIPTokenizer"] if has_text else [None, None])
        index.setdefault("text_encoder", [None, None])
    return index


def _read_spec(model_dir: str) -> ModelSpec | None:
    """The model directory's spec without its weights, or None where :func:`ddim_jax.models.load` will say what
    is wrong with its spec file."""
    try:
        with open(os.path.join(model_dir, models.SPEC_FILE)) as f:
            return ModelSpec.from_dict(json.load(f)["spec"])
    except (ValueError, TypeError, KeyError, OSError):
        return None


def export_diffusers(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> str:
    """Writes the model directory ``model_dir`` (:func:`ddim_jax.models.load`) as the diffusers folder ``out``
    (see the module's doc); returns the class diffusers loads it with (``"StableDiffusionPipeline"``,
    ``"DDIMPipeline"``, ``"AutoencoderKL"``, ...). What cannot be exported is refused from the spec, before the
    weights are read."""
    model_dir, out = os.path.abspath(os.fspath(model_dir)), os.path.abspath(os.fspath(out))
    if not models.is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a model directory ({models.SPEC_FILE}); a training run's "
                                f"exported model is its workdir's {models.EXPORT_DIR}/")
    check_destination(out, overwrite)
    tokenizer = (models.load_tokenizer(model_dir) if os.path.isdir(os.path.join(model_dir, models.TOKENIZER_DIR))
                 else None)
    spec = _read_spec(model_dir)
    if spec is not None:
        _parts(spec, None, tokenizer)
    spec, params = models.load(model_dir)
    cls, parts, index = _parts(spec, params, tokenizer)
    from safetensors.numpy import save_file

    with files.replace_dir(out, overwrite=overwrite, may_replace=_holds_only_an_export) as tmp:
        for name, (config_file, config, sd, weights) in parts.items():
            folder = os.path.join(tmp, name)
            os.makedirs(folder, exist_ok=True)
            _write_json(os.path.join(folder, config_file), config)
            if sd is not None:
                save_file(sd, os.path.join(folder, weights), metadata={"format": "pt"})
        if index is not None:
            _write_json(os.path.join(tmp, MODEL_INDEX), index)
        if "text_encoder" in parts:
            tokenizer.save(os.path.join(tmp, models.TOKENIZER_DIR))
    return cls


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")

"""Training configurations (ml_collections): the schema every config starts from, and its checks.

:func:`base_config` is the embedded digits run and the schema: a config may only hold the fields it
has (:func:`validate_config` names any other). :func:`paper_config` gives the DDPM/DDIM setups of
``configs/paper.py``.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import ml_collections
from ml_collections import config_dict

from ddim_jax import kinds
from ddim_jax.concat import CONDITIONS
from ddim_jax.data import check_classes
from ddim_jax.diffusion import PREDICTION_TYPES
from ddim_jax.distillation import METHODS, METRICS, ODE_SOLVERS, WEIGHTINGS
from ddim_jax.models import ModelSpec
from ddim_jax.nets import COMPUTE_DTYPES
from ddim_jax.schedules import SCHEDULES

# Fields that may change when a run is resumed (extending training, logging cadence, where the data is).
RESUMABLE_CHANGES = ("training.num_steps", "training.log_every", "training.sample_every",
                     "training.checkpoint_every", "training.keep_checkpoints", "training.remat", "training.mesh",
                     "data.data_dir", "data.num_workers", "data.prefetch")

CROPS = ("center", "celeba", "none")
# What training.lora.targets may name: the denoiser's kernels that get low-rank adapters.
LORA_TARGETS = ("attention", "feed_forward", "conv1x1", "conv3x3")
MAX_PREFETCH = 64  # steps of batches loaded ahead (each is a whole global batch in host memory)


def _model_block(kind: str, objective: str) -> ml_collections.ConfigDict:
    """A new config's model block for ``kind`` (a trainable kind of :mod:`ddim_jax.kinds` with this
    objective): its architecture defaults, and ``num_classes`` for a diffusion model."""
    allowed = [k for k in kinds.trainable() if kinds.KINDS[k].objective == objective]
    if kind not in allowed:
        raise ValueError(f"kind must be one of {', '.join(allowed)}; got {kind!r}")
    entry = kinds.KINDS[kind]
    values = entry.full_arch(entry.defaults)
    if objective == "diffusion":
        values.setdefault("num_classes", None)  # None = unconditional; else the data's classes (labels 0..K-1)
    types = dict(entry.optional_fields(), num_classes=int)
    m = ml_collections.ConfigDict()
    m.kind = kind
    for name, v in values.items():
        m[name] = config_dict.placeholder(types.get(name, object)) if v is None else v
    return m


def base_config(kind: str = "unet") -> ml_collections.ConfigDict:
    """The schema of a diffusion run (the embedded digits' defaults). ``kind``: the model block's network,
    a trainable diffusion kind of :mod:`ddim_jax.kinds` (``'unet'``: DDPM's UNet; ``'cross_attention_unet'``:
    latent diffusion's class-conditional UNet with cross-attention), with that kind's defaults."""
    model = _model_block(kind, "diffusion")
    c = ml_collections.ConfigDict()

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "digits"  # 'digits', 'folder', or a tfds name such as 'cifar10', 'celeb_a', 'lsun/church_outdoor'
    d.split = "train"
    d.data_dir = ""  # tfds data_dir ('' = tfds' default, ~/tensorflow_datasets)
    d.folder = ""  # for dataset = 'folder'
    d.image_size = 8
    d.channels = 1
    d.crop = "center"  # 'center', 'celeba' or 'none' (tfds and folder sources)
    d.random_flip = False  # digits are not mirror-symmetric; the paper's datasets flip (paper_config)
    d.num_workers = -1  # grain worker processes reading folder/tfds images (-1 = the usable cores, 0 = in process)
    d.prefetch = 2  # steps loaded ahead by those workers
    # None: every class; else the labels to keep, e.g. (0, 1, 2, 3, 4): a labelled dataset's examples of those
    # classes only (labels unchanged), in every split (ddim_jax.data.ClassSubset)
    d.classes = config_dict.placeholder(tuple)

    c.model = model  # the network's architecture (ddim_jax.kinds: the kind's module fields)

    c.latent = lat = ml_collections.ConfigDict()  # latent diffusion (Rombach et al.): diffuse an autoencoder's latents
    lat.autoencoder = ""  # '' = pixel space; else a trained autoencoder: a model directory or its training workdir
    lat.scale_factor = 0.0  # latents are multiplied by this; 0 = 1/std of the first training images' latents

    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "cosine"  # for the 8x8 digits; the paper's configs use 'linear' (paper_config)
    f.concat = ""  # conditioning by concatenation: '' = none, or a task of ddim_jax.concat.CONDITIONS
    f.beta_start = 1e-4
    f.beta_end = 0.02
    f.num_timesteps = 1000
    f.prediction_type = "epsilon"

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.num_steps = 4000
    t.lr = 2e-3
    t.warmup_steps = 200
    t.grad_clip = 1.0
    t.adam_b1 = 0.9  # Adam's decay rates (optax's defaults; GAN-trained autoencoders use 0.5, 0.9)
    t.adam_b2 = 0.999
    t.ema_decay = 0.999
    t.ema_warmup = True  # EMA decay min(ema_decay, (1 + step) / (10 + step)): the initial weights fade out fast
    t.p_uncond = 0.1  # class-conditional models: share of labels dropped to the null class (0 = no null class)
    t.seed = 0
    t.steps_per_dispatch = 1  # train steps per compiled call (lax.scan)
    t.compute_dtype = "float32"  # 'bfloat16': mixed precision (params, Adam, EMA, loss, softmax, norm stats in float32)
    t.remat = False  # recompute each ResNet block's activations in the backward pass: less memory, same numbers
    # The device mesh (data, fsdp): the batch is split over all devices; parameters, EMA and Adam state are
    # split over the fsdp devices (FSDP) and replicated over data. -1: the devices left. (-1, 1): all on data.
    t.mesh = (-1, 1)
    t.log_every = 100
    t.checkpoint_every = 1000
    t.keep_checkpoints = 3
    t.sample_every = 1000  # 0 = never
    t.num_sample_images = 64
    t.sample_steps = 50  # DDIM steps for the sample grids
    t.max_nonfinite = 10  # stop after this many non-finite losses in a row
    # Fine-tuning: '' = random initial weights; else a model directory or a training workdir whose model the
    # run starts from (its architecture, schedule and autoencoder: model fields left at their defaults are
    # filled from it, others must agree; ddim_jax.training.finetune).
    t.init_from = ""
    t.lora = lo = ml_collections.ConfigDict()  # low-rank adapters on the init model's frozen kernels
    lo.rank = config_dict.placeholder(int)  # None = no LoRA (the whole network trains)
    lo.alpha = config_dict.placeholder(float)  # the update is alpha / rank * B @ A; None = alpha is the rank
    lo.targets = ("attention",)  # of LORA_TARGETS: attention projections, feed_forward, conv1x1, conv3x3
    # Few-step distillation of a trained teacher (ddim_jax.training.distill); the student starts as its copy.
    t.distill = ds = ml_collections.ConfigDict()
    ds.method = ""  # '' = none; 'progressive' (Salimans and Ho) or 'consistency' (Song et al.)
    ds.teacher = ""  # the teacher: a model directory or a training workdir (its export)
    ds.guidance = config_dict.placeholder(float)  # a class-conditional teacher's guidance scale (None = 1: none)
    ds.steps = 0  # progressive: the first round's student steps (the teacher takes twice as many); consistency:
    #               the discretisation's points N (round(linspace(0, T - 1, N)))
    ds.final_steps = 1  # progressive: the last round's student steps (steps / final_steps a power of 2)
    ds.round_steps = 0  # progressive: training steps per round (training.num_steps = round_steps x rounds)
    ds.prediction_type = "v"  # the student network's output, 'v' or 'x0' (eps is unstable at few steps)
    ds.weighting = "truncated_snr"  # progressive: the x-loss weight, 'truncated_snr' max(SNR, 1) or 'snr_plus_one'
    ds.solver = "ddim"  # consistency: the teacher's ODE step between adjacent points, 'ddim' or 'dpmpp_2m'
    ds.metric = "pseudo_huber"  # consistency: 'l2' or 'pseudo_huber'
    ds.sigma_data = 0.5  # consistency: c_skip / c_out's sigma_data
    ds.timestep_scaling = 10.0  # consistency: c_skip / c_out's s = timestep_scaling x t
    ds.sample_steps = 1  # consistency: the student's default sampling steps (sample.py's --steps)
    return c


def autoencoder_config(kind: str = "autoencoder_kl") -> ml_collections.ConfigDict:
    """The schema of an autoencoder run: the data and training blocks of :func:`base_config`, the
    autoencoder's fields in the model block (``kind = 'autoencoder_kl'``:
    :class:`ddim_jax.autoencoder.AutoencoderKL`; ``'autoencoder_vq'``: :class:`~ddim_jax.autoencoder.AutoencoderVQ`),
    and a loss block (latent diffusion's: L1 reconstruction + KL or VQ loss + a PatchGAN's hinge loss). The
    defaults are the small f = 4 autoencoder of the upscaled digits (``autoencoder.DIGITS_F4``,
    ``configs/autoencoder_digits.py``)."""
    model = _model_block(kind, "autoencoder")
    base = base_config()
    c = ml_collections.ConfigDict()
    c.data = base.data
    c.data.image_size = 32
    c.model = model

    c.loss = loss = ml_collections.ConfigDict()
    loss.kl_weight = 1e-6  # KL autoencoders: on the per-image sums, as LDM's
    loss.codebook_weight = 1.0  # VQ autoencoders: the VQ loss's weight (codebook + beta x commitment)
    loss.disc_weight = 0.5  # adversarial term's weight (times the adaptive weight); 0 = no discriminator
    loss.disc_start = 1000  # the step the discriminator's losses switch on
    loss.disc_layers = 2  # PatchGAN stride-2 layers (taming's n_layers; 3 for 256x256 images)
    loss.disc_channels = 64  # its first layer's channels (ndf)
    # LPIPS (VGG16) perceptual term, from local files (ddim_jax.lpips; nothing is downloaded): '' = none.
    loss.lpips_vgg16 = ""  # torchvision's VGG16 weights (vgg16-397923af.pth, or .safetensors with its keys)
    loss.lpips_heads = ""  # LPIPS' linear heads (the lpips package's weights/v0.1/vgg.pth)
    loss.perceptual_weight = 1.0  # the LPIPS term's weight (LDM's), when the two files are given

    c.training = base.training
    c.training.update(lr=4.5e-4, warmup_steps=100, adam_b1=0.5, adam_b2=0.9, ema_decay=0.999, sample_steps=1)
    return c


def paper_config(dataset: str, image_size: int, ch_mult: tuple, *, crop: str, dropout: float, batch_size: int,
                 num_steps: int, lr: float) -> ml_collections.ConfigDict:
    """The DDPM/DDIM setup for a 3-channel dataset: ch 128, 2 res blocks, attention at 16x16,
    warmup 5000, EMA 0.9999, grad clip 1.0, linear betas 1e-4 .. 0.02 over T = 1000."""
    c = base_config()
    c.data.update(dataset=dataset, image_size=image_size, channels=3, crop=crop, random_flip=True)
    c.diffusion.update(schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    c.model.update(ch=128, ch_mult=ch_mult, num_res_blocks=2, attn_resolutions=(16,), dropout=dropout)
    c.training.update(batch_size=batch_size, num_steps=num_steps, lr=lr, warmup_steps=5000, ema_decay=0.9999,
                      ema_warmup=False,
                      checkpoint_every=10_000, sample_every=10_000)
    return c


# ---------------------------------------------------------------------------------------------
# Checks and comparisons.


def to_dict(config) -> dict:
    """A config as plain JSON types (tuples become lists)."""
    return json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else json.loads(
        json.dumps(config))


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Fields added after runs were saved without them, with the value that reproduces how those runs trained
# (a field missing here takes base_config's default).
_WHEN_ABSENT = {"training.ema_warmup": False}
# Fields runs once wrote into their config when they started; they are the run record's now
# (ddim_jax.training.run.Record), and a saved config's copy of them is set aside when it is read. Such
# a latent run also wrote its estimated scale into latent.scale_factor: that is the record's too.
RECORDED_ELSEWHERE = ("latent.autoencoder_spec", "loss.lpips_sha256")


def objective(config) -> str:
    """What a config's model kind trains for (``"diffusion"`` or ``"autoencoder"``; an unknown kind counts as
    diffusion, whose checks then name it)."""
    kind = to_dict(config)["model"].get("kind", "unet")
    return kinds.KINDS[kind].objective if kind in kinds.KINDS else "diffusion"


SCHEMAS = {"diffusion": base_config, "autoencoder": autoencoder_config}


def schema(config) -> ml_collections.ConfigDict:
    """The default config of the objective ``config`` trains for: the fields it must have."""
    kind = to_dict(config)["model"].get("kind", "unet")
    return SCHEMAS[objective(config)](kind if kind in trainable_kinds() else "unet")


def trainable_kinds() -> list[str]:
    """The model kinds train.py trains (context-conditioned kinds are converted, not trained: no text data)."""
    return kinds.trainable()


def with_defaults(d: dict) -> dict:
    """A saved config with the fields it lacks (it was written before they existed) at the values that
    reproduce how it trained: :data:`_WHEN_ABSENT`, else the defaults."""
    out = flatten(to_dict(schema(d)))
    out.update(_WHEN_ABSENT)
    out.update({k: v for k, v in flatten(to_dict(d)).items() if k not in RECORDED_ELSEWHERE})
    nested: dict = {}
    for k, v in out.items():
        *blocks, field = k.split(".")
        node = nested
        for b in blocks:
            node = node.setdefault(b, {})
        node[field] = v
    return nested


def config_differences(saved: dict, given: dict) -> list[str]:
    """Dotted keys whose values differ, except the fields a resumed run may change (fields the saved
    config lacks count as their defaults)."""
    a, b = flatten(with_defaults(saved)), flatten(to_dict(given))
    skip = set(RESUMABLE_CHANGES)
    if "latent.autoencoder_spec" in flatten(to_dict(saved)):  # written when records lived in the config
        skip.add("latent.scale_factor")  # compared as the record's scale instead
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in skip]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mesh_shape(mesh, num_devices: int) -> tuple[int, int]:
    """``training.mesh`` as ``(data, fsdp)`` device counts for ``num_devices`` devices (a -1 is the devices
    left); a one-line ValueError naming the field when it is not two positive integers (one may be -1)
    whose product is ``num_devices``."""
    what = (f"(data, fsdp): two positive integers whose product is the number of devices ({num_devices}), "
            "or one of them -1 (the devices left)")
    if not (isinstance(mesh, (tuple, list)) and len(mesh) == 2 and all(_int(n) and (n >= 1 or n == -1) for n in mesh)
            and list(mesh).count(-1) < 2):
        raise ValueError(f"training.mesh must be {what}; got {mesh!r}")
    data, fsdp = mesh
    known = data * fsdp * (-1 if -1 in mesh else 1)
    if num_devices % known or (-1 not in mesh and known != num_devices):
        raise ValueError(f"training.mesh must be {what}; got {tuple(mesh)!r}")
    return (num_devices // fsdp if data == -1 else data), (num_devices // data if fsdp == -1 else fsdp)


def validate_config(config, num_devices: int = 1, num_processes: int = 1) -> None:
    """Raises a one-line ValueError naming the first field that is unknown or out of range.

    ``num_devices`` and ``num_processes`` are those the run will use (the global batch is split over them).
    """
    kind = to_dict(config).get("model", {}).get("kind", "unet")
    if kind not in trainable_kinds():
        raise ValueError(f"model.kind must be one of {', '.join(trainable_kinds())}; got {kind!r}")
    goal = objective(config)
    default = SCHEMAS[goal]
    fields = flatten(to_dict(schema(config)))
    given = flatten(to_dict(config))
    unknown = sorted(set(given) - set(fields))
    if unknown:
        block = unknown[0].split(".")[0]
        known = sorted(k for k in fields if k.startswith(block + "."))
        blocks = sorted({k.split(".")[0] for k in fields})
        allowed = (f"the {block} block has {', '.join(k.split('.', 1)[1] for k in known)}" if known
                   else f"the blocks of a {kind} config are {', '.join(blocks)}")
        raise ValueError(f"unknown config field {unknown[0]}; {allowed}")
    missing = sorted(set(fields) - set(given))
    if missing:
        raise ValueError(f"config field {missing[0]} is missing (start configs from "
                         f"ddim_jax.config.{default.__name__})")
    t, d = config["training"], config["data"]

    def need(ok: bool, field: str, what: str):
        if not ok:
            value = config[field.split(".")[0]][field.split(".")[1]]
            raise ValueError(f"{field} must be {what}; got {value!r}")

    for name in ("batch_size", "steps_per_dispatch", "log_every", "checkpoint_every", "keep_checkpoints",
                 "max_nonfinite", "num_sample_images", "sample_steps"):
        need(_int(t[name]) and t[name] >= 1, f"training.{name}", "a positive integer")
    for name in ("num_steps", "warmup_steps", "sample_every", "seed"):
        need(_int(t[name]) and t[name] >= 0, f"training.{name}", "an integer >= 0")
    need(_real(t.lr) and t.lr > 0, "training.lr", "a finite number > 0")
    need(_real(t.grad_clip) and t.grad_clip > 0, "training.grad_clip", "a finite number > 0")
    need(_real(t.ema_decay) and 0 <= t.ema_decay < 1, "training.ema_decay", "a number in [0, 1)")
    need(_real(t.adam_b1) and 0 <= t.adam_b1 < 1, "training.adam_b1", "a number in [0, 1)")
    need(_real(t.adam_b2) and 0 <= t.adam_b2 < 1, "training.adam_b2", "a number in [0, 1)")
    need(isinstance(t.ema_warmup, bool), "training.ema_warmup", "True or False")
    need(isinstance(t.remat, bool), "training.remat", "True or False")
    need(isinstance(t.compute_dtype, str) and t.compute_dtype in COMPUTE_DTYPES, "training.compute_dtype",
         f"one of {', '.join(COMPUTE_DTYPES)}")
    mesh_shape(t.mesh, num_devices)
    if t.batch_size % num_devices:
        raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of devices "
                         f"({num_devices})")
    if t.batch_size % num_processes:
        raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of processes "
                         f"({num_processes})")
    for name in ("log_every", "checkpoint_every", "sample_every"):
        if t[name] % t.steps_per_dispatch:
            raise ValueError(f"training.{name} ({t[name]}) must be {'0 or ' if name == 'sample_every' else ''}"
                             f"a multiple of training.steps_per_dispatch ({t.steps_per_dispatch})")
    need(d.channels in (1, 3), "data.channels", "1 (grey) or 3 (RGB)")
    need(_int(d.num_workers) and d.num_workers >= -1, "data.num_workers", "an integer >= 0, or -1 (the usable cores)")
    need(_int(d.prefetch) and 0 <= d.prefetch <= MAX_PREFETCH, "data.prefetch", f"an integer in [0, {MAX_PREFETCH}]")
    need(_int(d.image_size) and d.image_size >= 1, "data.image_size", "a positive integer")
    need(d.crop in CROPS, "data.crop", f"one of {', '.join(CROPS)}")
    _check_classes(d)
    entry = kinds.KINDS[kind]
    arch = {k: v for k, v in to_dict(config["model"]).items() if k in entry.arch_fields}
    arch = entry.full_arch(arch)
    for check in (entry.check, entry.train_check):
        check(arch, lambda ok, field, what: need(ok, f"model.{field}", what))
    need(t.remat is False or entry.remat, "training.remat", f"False (remat is not offered for {kind})")
    _CHECKS[goal](config, need)
    _check_finetune(config, goal)
    _check_distill(config, goal)
    if goal == "diffusion" and (config.latent.autoencoder or t.init_from or distilling(config)):
        return  # the model's shape is the autoencoder's latents': checked once it is read (training.run)
    spec_from_config(config)  # the model block's own checks (kind, arguments, schedule)


def _check_classes(d) -> None:
    """``data.classes``: None, or distinct class indices of a dataset with labels (the digits: 0..9; a folder's
    or tfds dataset's labels are checked when it is opened, ddim_jax.data.ClassSubset)."""
    if d.classes is None:
        return
    classes = check_classes(d.classes)
    if d.dataset == "digits" and classes[-1] > 9:
        raise ValueError(f"data.classes names class {classes[-1]}, but dataset 'digits' has 10 classes (0..9)")


def _check_diffusion(config, need) -> None:
    t, m, f, lat = config["training"], config["model"], config["diffusion"], config["latent"]
    need(f.schedule in SCHEDULES, "diffusion.schedule", f"one of {', '.join(SCHEDULES)}")
    need(f.prediction_type in PREDICTION_TYPES, "diffusion.prediction_type", f"one of {', '.join(PREDICTION_TYPES)}")
    need(_int(f.num_timesteps) and f.num_timesteps >= 2, "diffusion.num_timesteps", "an integer >= 2")
    need(_real(t.p_uncond) and 0 <= t.p_uncond < 1, "training.p_uncond", "a number in [0, 1)")
    need(f.concat == "" or f.concat in CONDITIONS, "diffusion.concat",
         f"'' (no concat conditioning) or one of {', '.join(sorted(CONDITIONS))}")
    need(isinstance(lat.autoencoder, str), "latent.autoencoder",
         "'' (pixel space) or the path of a trained autoencoder (a model directory or its training workdir)")
    need(_real(lat.scale_factor) and lat.scale_factor >= 0, "latent.scale_factor",
         "a finite number > 0, or 0 (estimated from the data)")
    if kinds.KINDS[m.kind].needs_labels:
        need(_int(m.num_classes) and m.num_classes >= 1, "model.num_classes",
             f"the number of classes of the data (a {m.kind} is class-conditional)")
    need(m.num_classes is None or (_int(m.num_classes) and m.num_classes >= 1), "model.num_classes",
         "None (unconditional) or the number of classes of the data")


def _check_autoencoder(config, need) -> None:
    d, m, loss = config["data"], config["model"], config["loss"]
    f = 2 ** (len(m.block_out_channels) - 1)
    need(d.image_size % f == 0, "data.image_size",
         f"a multiple of {f} (the autoencoder halves it {len(m.block_out_channels) - 1} times)")
    need(_real(loss.kl_weight) and loss.kl_weight >= 0, "loss.kl_weight", "a finite number >= 0")
    need(_real(loss.codebook_weight) and loss.codebook_weight >= 0, "loss.codebook_weight", "a finite number >= 0")
    need(_real(loss.disc_weight) and loss.disc_weight >= 0, "loss.disc_weight",
         "a finite number >= 0 (0: no discriminator)")
    need(_int(loss.disc_start) and loss.disc_start >= 0, "loss.disc_start", "an integer >= 0")
    need(_int(loss.disc_layers) and 1 <= loss.disc_layers and d.image_size >= 2 ** (loss.disc_layers + 1),
         "loss.disc_layers", f"a positive integer with 2^(layers + 1) <= data.image_size ({d.image_size})")
    need(_int(loss.disc_channels) and loss.disc_channels >= 8 and loss.disc_channels % 8 == 0, "loss.disc_channels",
         "a positive multiple of 8")
    for name in ("lpips_vgg16", "lpips_heads"):
        need(isinstance(loss[name], str), f"loss.{name}", "'' (no perceptual term) or the path of a local weights file")
    need(bool(loss.lpips_vgg16) == bool(loss.lpips_heads),
         "loss.lpips_heads" if loss.lpips_vgg16 else "loss.lpips_vgg16",
         "given with the other LPIPS file (the VGG16 trunk and LPIPS' heads), or both ''")
    need(_real(loss.perceptual_weight) and loss.perceptual_weight >= 0, "loss.perceptual_weight",
         "a finite number >= 0")
    need(not loss.lpips_vgg16 or d.image_size >= 16, "data.image_size",
         ">= 16 with an LPIPS term (VGG16 pools the images 4 times)")


def _check_finetune(config, goal: str) -> None:
    t = config["training"]
    lo = t.lora
    if not isinstance(t.init_from, str):
        raise ValueError(f"training.init_from must be '' (random initial weights) or the path of a model directory "
                         f"or training workdir; got {t.init_from!r}")
    if t.init_from and goal != "diffusion":
        raise ValueError(f"training.init_from must be '' for a {goal} run (fine-tuning applies to diffusion models)")
    if lo.rank is not None and not (_int(lo.rank) and lo.rank >= 1):
        raise ValueError(f"training.lora.rank must be None (no LoRA) or a positive integer; got {lo.rank!r}")
    if lo.alpha is not None and not (_real(lo.alpha) and lo.alpha > 0):
        raise ValueError(f"training.lora.alpha must be None (the rank) or a finite number > 0; got {lo.alpha!r}")
    targets = lo.targets
    if (not isinstance(targets, (tuple, list)) or not targets or len(set(targets)) != len(targets)
            or any(x not in LORA_TARGETS for x in targets)):
        bad = next((x for x in targets if x not in LORA_TARGETS), None) if isinstance(targets, (tuple, list)) else None
        raise ValueError(f"training.lora.targets must be distinct names from {', '.join(LORA_TARGETS)}; got "
                         f"{(bad if bad is not None else targets)!r}")
    if lo.rank is not None and not t.init_from:
        raise ValueError("training.lora.rank needs training.init_from: the model whose frozen weights the adapters "
                         "adapt")


def distilling(config) -> str:
    """The distillation method a config trains with ('' = none)."""
    ds = config["training"].get("distill")
    return (ds.get("method") or "") if ds is not None else ""


def progressive_rounds(config) -> list[int]:
    """A progressive distillation config's student step count of each round: steps, steps / 2, ..., final_steps."""
    ds = config.training.distill
    out = [ds.steps]
    while out[-1] > ds.final_steps:
        out.append(out[-1] // 2)
    return out


def _check_distill(config, goal: str) -> None:
    t = config["training"]
    ds = t.distill

    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ValueError(f"training.distill.{name} must be {what}; got {ds[name]!r}")

    need(ds.method == "" or ds.method in METHODS, "method", f"'' (no distillation) or one of {', '.join(METHODS)}")
    if not ds.method:
        return
    if goal != "diffusion":
        raise ValueError(f"training.distill.method must be '' for a {goal} run (distillation applies to diffusion "
                         "models)")
    need(isinstance(ds.teacher, str) and ds.teacher != "", "teacher",
         "the path of the teacher: a model directory or a training workdir")
    if t.init_from:
        raise ValueError("training.init_from must be '' with training.distill: the student starts as a copy of "
                         "training.distill.teacher")
    if t.lora.rank is not None:
        raise ValueError("training.lora.rank must be None with training.distill (the whole student trains)")
    need(ds.guidance is None or (_real(ds.guidance) and ds.guidance >= 0), "guidance",
         "None (no guidance) or a finite number >= 0")
    need(ds.prediction_type in ("v", "x0"), "prediction_type", "'v' or 'x0'")
    if ds.method == "progressive":
        need(_int(ds.final_steps) and ds.final_steps >= 1, "final_steps", "a positive integer")
        k = ds.steps // ds.final_steps if _int(ds.steps) and ds.steps >= 1 else 0
        need(_int(ds.steps) and ds.steps >= ds.final_steps and ds.steps % ds.final_steps == 0 and k & (k - 1) == 0,
             "steps", f"training.distill.final_steps ({ds.final_steps}) times a power of 2")
        need(_int(ds.round_steps) and ds.round_steps >= 1 and ds.round_steps % t.steps_per_dispatch == 0,
             "round_steps", f"a positive multiple of training.steps_per_dispatch ({t.steps_per_dispatch})")
        rounds = len(progressive_rounds(config))
        if t.num_steps != ds.round_steps * rounds:
            raise ValueError(f"training.num_steps must be training.distill.round_steps x the rounds "
                             f"({ds.round_steps} x {rounds} = {ds.round_steps * rounds}: {ds.steps} down to "
                             f"{ds.final_steps} steps); got {t.num_steps}")
        need(ds.weighting in WEIGHTINGS, "weighting", f"one of {', '.join(WEIGHTINGS)}")
    else:
        need(ds.solver in ODE_SOLVERS, "solver", f"one of {', '.join(ODE_SOLVERS)}")
        low = 3 if ds.solver == "dpmpp_2m" else 2
        need(_int(ds.steps) and ds.steps >= low, "steps", f"an integer >= {low} (the discretisation's points"
             + (", 3 for dpmpp_2m's two steps)" if low == 3 else ")"))
        need(ds.metric in METRICS, "metric", f"one of {', '.join(METRICS)}")
        need(_real(ds.sigma_data) and ds.sigma_data > 0, "sigma_data", "a finite number > 0")
        need(_real(ds.timestep_scaling) and ds.timestep_scaling > 0, "timestep_scaling", "a finite number > 0")
        need(_int(ds.sample_steps) and ds.sample_steps >= 1, "sample_steps", "a positive integer")


_CHECKS = {"diffusion": _check_diffusion, "autoencoder": _check_autoencoder}


def spec_from_config(config, *, autoencoder: ModelSpec | None = None, scale_factor: float | None = None) -> ModelSpec:
    """The spec of the model a training config (ml_collections or its JSON dict) trains. A latent config's
    model also needs its ``autoencoder``'s spec and the latents' ``scale_factor`` (else the config's; None:
    not estimated yet), which the run finds when it starts (:func:`ddim_jax.training.run.resolve`)."""
    d = config if isinstance(config, Mapping) else json.loads(config.to_json())
    model, data = dict(d["model"]), d["data"]
    kind = model.pop("kind", "unet")
    if kinds.get(kind).objective != "diffusion":
        return ModelSpec(kind, model, data["image_size"], data["channels"], None, None, info={"data": dict(data)})
    f = d["diffusion"]
    num_classes = model.pop("num_classes", None)
    null_label = num_classes if num_classes is not None and d["training"].get("p_uncond", 0.1) > 0 else None
    schedule = {"name": f["schedule"], "num_timesteps": f["num_timesteps"]}
    if f["schedule"] != "cosine":
        schedule.update(beta_start=f["beta_start"], beta_end=f["beta_end"])
    size, channels, latent = data["image_size"], data["channels"], {}
    lat = d.get("latent") or {}
    if lat.get("autoencoder") or autoencoder is not None:  # (a latent training.init_from's autoencoder: the latter)
        if autoencoder is None:
            raise ValueError(f"the autoencoder {lat['autoencoder']!r} of this latent config has not been read yet "
                             "(ddim_jax.training.run.resolve reads it)")
        size, channels = autoencoder.latent_shape
        latent = dict(autoencoder=autoencoder, scale_factor=scale_factor or lat.get("scale_factor") or None)
    return ModelSpec(kind, model, size, channels, schedule, f["prediction_type"], num_classes, null_label,
                     info={"data": dict(data)}, concat=f.get("concat") or None, **latent)

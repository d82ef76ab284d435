"""Samples from a trained model and runs the paper's experiments.

    python sample.py --workdir=runs/digits                          # 64 DDIM samples, S = 50
    python sample.py --workdir=runs/digits --mode=consistency       # Figure 4
    python sample.py --workdir=runs/digits --mode=interpolation     # Figure 5
    python sample.py --workdir=runs/digits --mode=sequence          # predicted x0 along the trajectory
    python sample.py --workdir=runs/digits --mode=reconstruction    # Table 2's protocol
    python sample.py --workdir=runs/digits --mode=fid --num_samples=2000 --fid_steps=10,20,50 --fid_etas=0,1
    python sample.py --workdir=runs/digits --steps=10 --solver=dpmpp_2m          # DPM-Solver++ (2M)
    python sample.py --workdir=runs/digits_cond --labels=3,7 --guidance=3        # class-conditional, guided
    python sample.py --workdir=runs/big --mesh=-1,4     # parameters split over groups of 4 devices (FSDP)
    python sample.py --checkpoint=ckpt/cifar10 --mode=fid --inception_weights=pt_inception-2015-12-05-6726825d.pth
    python sample.py --checkpoint=sd15 --mode=text2img --prompt="a watercolor fox" --steps=30   # Stable Diffusion
    python sample.py --checkpoint=sd15 --mode=img2img --prompt="a fox, oil painting" --init_image=in.png --strength=0.6
    python sample.py --checkpoint=sd15-inpainting --mode=inpaint --prompt="a red door" --init_image=in.png --mask=m.png
    python sample.py --checkpoint=sd15 --mode=text2img --prompt="a fox" --lora=style.safetensors --lora_scale=0.8 \
        --height=512 --width=768

Outputs go to --output (default: <workdir>/<mode>, or <checkpoint>_<mode> beside a model directory,
with the solver, labels, guidance, LoRA and size appended when they are not the defaults, e.g. sample_dpmpp_2m_g3);
existing files are kept unless --overwrite, and are then replaced atomically; one run at a time writes to an
output directory (a second is refused at once), and a run that fails removes the directories it created.
Sample mode streams to samples.npy (uint8 [N, H, W, C]) and writes labels.npy for a class-conditional model.

Each mode is one entry of MODES (its runner, its files, the flags it takes); the flags are read and checked
once into a Settings value.
"""

import contextlib
import dataclasses
import math
import os
import sys
from typing import Callable

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A training run directory (its EMA params are used).")
flags.DEFINE_string("checkpoint", None, "A model directory (python -m ddim_jax.convert, or a run's model/).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
flags.DEFINE_string("mode", "sample", "sample | consistency | interpolation | sequence | reconstruction | fid | "
                    "text2img | img2img | inpaint")
flags.DEFINE_integer("steps", None, "Number of sampling steps S (default: a distilled student's own count, else 50).")
flags.DEFINE_string("solver", "ddim", "Sampler: ddim | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde | unipc | plms (eta is "
                    "DDIM's; the others take none).")
flags.DEFINE_string("labels", "all", "Class-conditional models: 'all' (every class in turn), a comma-separated "
                    "list of classes (cycled over the samples), or 'none' (the unconditional model).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale for class-conditional models and prompts (1 = "
                   "no guidance, 0 = unconditional, > 1 = stronger; default: none, 7.5 with prompts).")
flags.DEFINE_string("prompt", None, "text2img, img2img, inpaint on a text-conditioned model (a Stable Diffusion folder "
                    "converted with its text encoder): the prompt.")
flags.DEFINE_string("negative_prompt", None, "The prompt guided away from (default: the empty prompt).")
flags.DEFINE_string("prompts_file", None, "A text file of prompts, one per line (instead of --prompt); images cycle "
                    "through them.")
flags.DEFINE_string("init_image", None, "img2img, inpaint: the input image, a PNG at the model's image size.")
flags.DEFINE_float("strength", None, "img2img, inpaint: how far the input is noised, in (0, 1] (1 = from pure noise; "
                   "default 0.8 for img2img, 1 for inpaint).")
flags.DEFINE_string("mask", None, "inpaint: a PNG of --init_image's size, white = repaint.")
flags.DEFINE_integer("resample", 1, "inpaint with a model that is not an inpainting UNet (RePaint): times each step "
                     "is taken (1 = no resampling).")
flags.DEFINE_string("lora", None, "text2img, img2img, inpaint on a Stable Diffusion model: a LoRA file (.safetensors, "
                    "diffusers/peft or kohya keys) merged into its UNet and text encoder.")
flags.DEFINE_float("lora_scale", 1.0, "--lora's scale: W + scale * (alpha / r) * B @ A.")
flags.DEFINE_integer("height", None, "text2img: the images' height in pixels, a multiple of the autoencoder's factor "
                     "times the UNet's (default: the model's image size).")
flags.DEFINE_integer("width", None, "text2img: the images' width (as --height).")
flags.DEFINE_string("eta", "0", "eta (0 = DDIM, 1 = DDPM), or 'sigma_hat' for the larger DDPM variance.")
flags.DEFINE_string("spacing", None, "Timestep spacing: uniform | quadratic | leading | trailing | linspace "
                    "| karras | exponential (default: the solver's, ddim_jax.solvers.DEFAULT_SPACING).")
flags.DEFINE_integer("num_samples", None, "Number of samples N (default: 64; 50,000 in fid mode).")
flags.DEFINE_integer("batch_size", 64, "Global batch size (a multiple of the device count).")
flags.DEFINE_list("mesh", ["-1", "1"], "The devices as a (data, fsdp) mesh, as training.mesh: the batch is split "
                  "over all of them, the parameters over the fsdp devices (by training's rule), e.g. 2,4 on 8 "
                  "devices; one of them may be -1 (the devices left). The pipeline modes (text2img, img2img, "
                  "inpaint) run on one device and take fsdp = 1 only.")
flags.DEFINE_integer("seed", 0, "Seed of the latents x_T.")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.DEFINE_list("steps_list", ["10", "20", "50", "100", "1000"], "S values for consistency / reconstruction.")
flags.DEFINE_list("fid_steps", ["10", "20", "50", "100"], "S values of the FID table.")
flags.DEFINE_list("fid_etas", ["0.0", "0.2", "0.5", "1.0", "sigma_hat"], "eta values of the FID table (DDIM rows).")
flags.DEFINE_list("fid_solvers", ["ddim"], "Solvers of the FID table: ddim (one row per --fid_etas) and/or "
                  "dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc, plms (one row each).")
flags.DEFINE_string("fid_stats", None, "Reference statistics .npz (default: computed from the training data and "
                    "cached).")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local path).")
flags.DEFINE_string("features", None, "Feature extractor for fid: inception | digits (default: digits for the "
                    "digits dataset, else inception).")
flags.DEFINE_string("data_dir", None, "tfds data_dir for reference statistics and reconstruction data.")
flags.DEFINE_string("dtype", "float32", "The network's compute dtype: float32 | bfloat16 (mixed precision on "
                    "accelerators; the sampler's arithmetic stays float32).")
flags.DEFINE_string("compile_cache", None, "Persistent compilation cache directory ('' = off; default: "
                    "$JAX_COMPILATION_CACHE_DIR or ~/.cache/ddim_jax/jax).")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------
# The settings: every flag read and checked once.


def _takes_prompts(model) -> bool:
    """Whether the model is conditioned on context arrays (text), so a pipeline mode takes prompts, not labels."""
    from ddim_jax import kinds

    return kinds.get(model.spec.kind).conditioning == "context"


DEFAULT_STEPS = 50  # --steps when not given, for a model that is not a distilled student


@dataclasses.dataclass(frozen=True)
class Settings:
    """The flags, parsed and checked once by :meth:`from_flags` (one-line ValueErrors naming the flag); the
    checks that need the model (its T, its classes, its conditioning) are :meth:`check_model`'s."""

    mode: str
    model_path: str  # --workdir or --checkpoint
    from_workdir: bool
    step: int | None
    num: int
    steps: int | None  # None: the model's default (a distilled student's own count, else DEFAULT_STEPS)
    solver: str
    eta: float
    sigma_hat: bool
    spacing: str | None
    seed: int
    batch_size: int
    labels: str | tuple[int, ...] | None  # "all" (every class in turn), classes (cycled), None (unconditional)
    guidance: float | None
    steps_list: tuple[int, ...]
    fid_steps: tuple[int, ...]
    fid_etas: tuple[str, ...]
    fid_solvers: tuple[str, ...]
    fid_stats: str | None
    inception_weights: str | None
    features: str | None
    data_dir: str | None
    dtype: str
    output: str | None
    overwrite: bool
    prompts: tuple[str, ...] | None = None  # --prompt or --prompts_file's lines
    negative_prompt: str | None = None
    init_image: object = None  # --init_image's pixels, uint8 [H, W, 3]
    strength: float | None = None
    mask: object = None  # --mask's pixels, bool [H, W] (True = repaint)
    resample: int = 1
    lora: object = None  # --lora's file, read (a ddim_jax.lora.Lora)
    lora_scale: float = 1.0
    height: int | None = None  # text2img's image size (default: the model's)
    width: int | None = None
    mesh: tuple[int, int] | None = None  # --mesh as (data, fsdp) device counts (None: all devices on data)

    @classmethod
    def from_flags(cls) -> "Settings":
        from ddim_jax import experiments as ex
        from ddim_jax.models import COMPUTE_DTYPES
        from ddim_jax.schedules import SPACINGS
        from ddim_jax.solvers import SOLVERS

        if FLAGS.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}; got {FLAGS.mode!r}")
        mode = MODES[FLAGS.mode]
        if FLAGS.spacing is not None and FLAGS.spacing not in SPACINGS:
            raise ValueError(f"--spacing must be one of {', '.join(SPACINGS)}; got {FLAGS.spacing!r}")
        if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
            raise ValueError("give exactly one of --workdir (a training run) or --checkpoint (a model directory)")
        if FLAGS.checkpoint is not None and FLAGS.step is not None:
            raise ValueError("--step picks a checkpoint of a --workdir; a --checkpoint holds one set of parameters")
        num = FLAGS.num_samples if FLAGS.num_samples is not None else mode.num_samples  # 0: one per prompt
        if num <= 0 and (FLAGS.num_samples is not None or not mode.prompts):
            raise ValueError(f"--num_samples must be >= 1; got {num}")
        if FLAGS.batch_size <= 0:
            raise ValueError(f"--batch_size must be >= 1; got {FLAGS.batch_size}")
        eta, sigma_hat = ex.parse_eta(FLAGS.eta)
        if FLAGS.features not in (None, "inception", "digits"):
            raise ValueError(f"--features must be inception or digits; got {FLAGS.features!r}")
        if FLAGS.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {FLAGS.dtype!r}")
        for name in FLAGS.fid_etas:
            ex.parse_eta(name)
        for name, values in (("solver", [FLAGS.solver]), ("fid_solvers", FLAGS.fid_solvers)):
            if not values or any(v not in SOLVERS for v in values):
                raise ValueError(f"--{name} must be among {', '.join(SOLVERS)}; got {','.join(values)!r}")
        if FLAGS.solver != "ddim" and (eta != 0 or sigma_hat):
            raise ValueError(f"--eta applies to --solver=ddim only; {FLAGS.solver} is deterministic (leave --eta at 0)")
        labels = _parse_labels(FLAGS.labels)
        if not mode.labels and (FLAGS.guidance is not None or labels != "all"):
            raise ValueError(f"--mode={FLAGS.mode} encodes and decodes with the unconditional model; --labels and "
                             "--guidance do not apply")
        if not mode.solvers and FLAGS.solver != "ddim":
            raise ValueError(f"--mode={FLAGS.mode} uses DDIM (its trajectory, its encoder); --solver applies to the "
                             f"{', '.join(n for n, m in MODES.items() if m.solvers)} modes")
        if FLAGS.guidance is not None and not math.isfinite(FLAGS.guidance):
            raise ValueError(f"--guidance must be a finite number (1 = no guidance); got {FLAGS.guidance}")
        if FLAGS.guidance is not None and labels is None:
            raise ValueError("--guidance needs classes to guide towards; --labels=none is the unconditional model")
        mesh = _mesh(FLAGS.mesh)
        if mode.prompts and mesh[1] > 1:
            sharded = ", ".join(n for n, m in MODES.items() if not m.prompts)
            raise ValueError(f"--mesh={','.join(FLAGS.mesh)}: --mode={FLAGS.mode} runs on one device (fsdp = 1); "
                             f"--mesh with fsdp > 1 applies to the {sharded} modes")
        inputs = _pipeline_inputs(mode)
        return cls(mesh=mesh, mode=FLAGS.mode, model_path=FLAGS.workdir or FLAGS.checkpoint,
                   from_workdir=FLAGS.workdir is not None, step=FLAGS.step, num=num, steps=FLAGS.steps,
                   solver=FLAGS.solver, eta=eta, sigma_hat=sigma_hat,
                   spacing=FLAGS.spacing, seed=FLAGS.seed, batch_size=FLAGS.batch_size, labels=labels,
                   guidance=FLAGS.guidance, steps_list=_int_list("steps_list", FLAGS.steps_list),
                   fid_steps=_int_list("fid_steps", FLAGS.fid_steps), fid_etas=tuple(FLAGS.fid_etas),
                   fid_solvers=tuple(FLAGS.fid_solvers), fid_stats=FLAGS.fid_stats,
                   inception_weights=FLAGS.inception_weights, features=FLAGS.features, data_dir=FLAGS.data_dir,
                   dtype=FLAGS.dtype, output=FLAGS.output, overwrite=FLAGS.overwrite, **inputs)

    def for_model(self, model) -> "Settings":
        """These settings with --steps' default resolved for the model: a distilled student's own step count
        (``spec.distilled["steps"]``), else :data:`DEFAULT_STEPS`."""
        if self.steps is not None:
            return self
        d = model.spec.distilled
        return dataclasses.replace(self, steps=DEFAULT_STEPS if d is None else int(d["steps"]))

    def check_model(self, model) -> None:
        """The step counts against the model's T, the labels against its classes, the mode against its
        conditioning."""
        T = model.schedule.num_timesteps
        for name in MODES[self.mode].step_flags:
            values = (self.steps,) if name == "steps" else getattr(self, name)
            bad = [v for v in values if not 1 <= v <= T]
            if bad:
                raise ValueError(f"--{name} must be in [1, {T}] (the model's T); got {bad[0]}")
        if MODES[self.mode].labels and not (MODES[self.mode].prompts and _takes_prompts(model)):
            if model.num_classes is None and (self.guidance is not None or self.labels != "all"):
                raise ValueError("--labels and --guidance apply to class-conditional models; this model is "
                                 "unconditional")
            bad = [v for v in self.labels if not 0 <= v < model.num_classes] if isinstance(self.labels, tuple) else []
            if bad:
                raise ValueError(f"--labels must be classes in [0, {model.num_classes}); got {bad[0]}")
        if model.spec.concat == "sd_inpaint" and self.mode != "inpaint":
            raise ValueError(f"--mode={self.mode} is not offered for an inpainting UNet (sd_inpaint); use "
                             "--mode=inpaint")
        if model.spec.concat is not None and not MODES[self.mode].concat:
            raise ValueError(f"--mode={self.mode} is not offered for a concat-conditioned model ({model.spec.concat}); "
                             "--mode=sample draws from held-out images' observations")
        if MODES[self.mode].prompts:
            self._check_pipeline(model)

    def _check_pipeline(self, model) -> None:
        """A text2img / img2img / inpaint run against the model: prompts for a text-conditioned model (with its
        text encoder), labels for the others, the input image's and mask's sizes."""
        if _takes_prompts(model):
            if self.prompts is None:
                raise ValueError(f"--mode={self.mode} on a text-conditioned model needs --prompt or --prompts_file")
            if getattr(model.spec, "text_encoder", None) is None:
                raise ValueError("--prompt needs a model with a text encoder; this one has none (convert the Stable "
                                 "Diffusion folder with its text_encoder/ and tokenizer/)")
            if self.labels != "all":
                raise ValueError("--labels applies to class-conditional models; this model takes --prompt")
        elif self.prompts is not None or self.negative_prompt is not None:
            raise ValueError("--prompt, --prompts_file and --negative_prompt apply to text-conditioned models; this "
                             f"model is {'class-conditional (use --labels)' if model.num_classes else 'unconditional'}")
        if self.height is not None or self.width is not None:
            from ddim_jax.pipelines import latent_size

            try:
                latent_size(model.spec, self.height, self.width)
            except ValueError as e:  # "height must be a positive multiple of 8 (...); got 500"
                raise ValueError(f"--{e}") from None
        if self.lora is not None:
            from ddim_jax.lora import lora_delta

            try:
                lora_delta(model.spec, self.lora)  # the modules it adapts, against the model's
            except ValueError as e:
                raise ValueError(_lora_error(self.lora.source, e)) from None
        if self.init_image is not None:
            h, w = self.init_image.shape[:2]
            H, W = model.spec.output_shape[:2]
            if (h, w) != (H, W):
                raise ValueError(f"--init_image is {w}x{h}; this model takes {W}x{H} images (resize it)")
        if self.mode == "inpaint" and model.spec.concat != "sd_inpaint" and self.solver != "ddim":
            raise ValueError(f"--solver={self.solver}: inpainting a model that is not an inpainting UNet (RePaint) "
                             "runs DDIM (--solver=ddim, with --eta)")

    def params(self, model):
        """The model's params for a pipeline mode, on one device (uncommitted, as a loaded model's; not replicated
        over every device), with --lora merged at --lora_scale."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from ddim_jax.lora import apply_lora

        params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), model.params)
        return params if self.lora is None else apply_lora(model.spec, params, self.lora, self.lora_scale)

    def cond(self, model) -> dict:
        """The experiments' ``labels`` and ``guidance`` for ``model``."""
        if model.num_classes is None:
            return {"labels": None, "guidance": None}
        return {"labels": list(self.labels) if isinstance(self.labels, tuple) else self.labels,
                "guidance": self.guidance}

    @property
    def labels_text(self) -> str:
        """--labels as given: all, none or the classes."""
        if isinstance(self.labels, tuple):
            return ",".join(map(str, self.labels))
        return "none" if self.labels is None else self.labels

    @property
    def output_name(self) -> str:
        """The mode with the settings that are not the defaults: e.g. sample_dpmpp_2m_labels3-7_g3."""
        from ddim_jax.solvers import resolve_spacing

        parts = [self.mode]
        if self.solver != "ddim" and self.mode != "fid":
            parts.append(self.solver)
        if self.spacing is not None and (self.mode == "fid" or self.spacing != resolve_spacing(self.solver, None)):
            parts.append(self.spacing)
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.labels != "all":
            parts.append("labels" + self.labels_text.replace(",", "-"))
        if self.guidance is not None:
            parts.append(f"g{self.guidance:g}")
        if self.lora is not None:
            stem = os.path.splitext(os.path.basename(self.lora.source))[0]
            parts.append(f"lora-{stem}" + ("" if self.lora_scale == 1 else f"-{self.lora_scale:g}"))
        parts += [f"{k[0]}{v}" for k, v in (("height", self.height), ("width", self.width)) if v is not None]
        return "_".join(parts)

    @property
    def out(self) -> str:
        """--output, else <workdir>/<name> or <checkpoint>_<name>: never inside a model directory (replacing a
        model replaces the whole directory)."""
        if self.output:
            return self.output
        if self.from_workdir:
            return os.path.join(self.model_path, self.output_name)
        return os.path.normpath(self.model_path) + f"_{self.output_name}"


def _read_png(path: str, flag: str, gray: bool = False):
    """A PNG's pixels (uint8 [H, W, 3], or [H, W] with ``gray``), or a one-line error naming the flag."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if gray else "RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--{flag} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--{flag} {path} is not an image ({type(e).__name__})") from None


def _pipeline_flags(mode) -> set[str]:
    """The prompt, image, mask, LoRA and size flags a mode takes."""
    return (({"--prompt", "--negative_prompt", "--prompts_file"} if mode.prompts else set())
            | ({"--init_image", "--strength"} if mode.init_image else set())
            | ({"--mask", "--resample"} if mode.mask else set())
            | ({"--lora", "--lora_scale"} if mode.lora else set())
            | ({"--height", "--width"} if mode.size else set()))


def _lora_error(path: str, e: Exception) -> str:
    """A LoRA problem (ddim_jax.lora's one-line messages start with the file's path) as one line naming --lora."""
    return f"--lora {path}: {str(e).removeprefix(path + ': ')}"


def _read_lora(path: str):
    """--lora's file, read and checked on its own (its fit to the model is check_model's)."""
    from ddim_jax.lora import read_lora

    try:
        return read_lora(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--lora {path} does not exist") from None
    except ValueError as e:
        raise ValueError(_lora_error(path, e)) from None


def _pipeline_inputs(mode) -> dict:
    """The prompt, image, mask, LoRA and size flags of text2img / img2img / inpaint, read and checked (files
    included)."""
    given = [f"--{name}" for name in ("prompt", "negative_prompt", "prompts_file", "init_image", "strength", "mask",
                                      "lora", "height", "width")
             if getattr(FLAGS, name) is not None] + (["--resample"] if FLAGS.resample != 1 else []) + (
        ["--lora_scale"] if FLAGS.lora_scale != 1 else [])
    wrong = [g for g in given if g not in _pipeline_flags(mode)]
    if wrong:
        offered = [name for name, m in MODES.items() if wrong[0] in _pipeline_flags(m)]
        raise ValueError(f"{wrong[0]} does not apply to --mode={FLAGS.mode} (it applies to --mode="
                         f"{', '.join(offered)})")
    if FLAGS.prompt is not None and FLAGS.prompts_file is not None:
        raise ValueError("give --prompt or --prompts_file, not both")
    prompts = None if FLAGS.prompt is None else (FLAGS.prompt,)
    if FLAGS.prompts_file is not None:
        try:
            with open(FLAGS.prompts_file, encoding="utf-8") as f:
                prompts = tuple(line.strip() for line in f if line.strip())
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts_file {FLAGS.prompts_file} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"--prompts_file {FLAGS.prompts_file} is not UTF-8 text") from None
        if not prompts:
            raise ValueError(f"--prompts_file {FLAGS.prompts_file} holds no prompts (one per line)")
    if FLAGS.strength is not None and not 0 < FLAGS.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1] (1 = from pure noise); got {FLAGS.strength}")
    if FLAGS.resample < 1:
        raise ValueError(f"--resample must be >= 1 (1 = no resampling); got {FLAGS.resample}")
    if not math.isfinite(FLAGS.lora_scale):
        raise ValueError(f"--lora_scale must be a finite number; got {FLAGS.lora_scale}")
    if FLAGS.lora_scale != 1 and FLAGS.lora is None:
        raise ValueError("--lora_scale scales --lora; give a LoRA file with --lora")
    for name in ("height", "width"):
        if getattr(FLAGS, name) is not None and getattr(FLAGS, name) < 1:
            raise ValueError(f"--{name} must be a positive number of pixels; got {getattr(FLAGS, name)}")
    if mode.init_image and FLAGS.init_image is None:
        raise ValueError(f"--mode={FLAGS.mode} needs --init_image (a PNG)")
    if mode.mask and FLAGS.mask is None:
        raise ValueError(f"--mode={FLAGS.mode} needs --mask (a PNG of --init_image's size, white = repaint)")
    init = None if FLAGS.init_image is None else _read_png(FLAGS.init_image, "init_image")
    mask = None
    if FLAGS.mask is not None:
        mask = _read_png(FLAGS.mask, "mask", gray=True) >= 128
        if mask.shape != init.shape[:2]:
            raise ValueError(f"--mask is {mask.shape[1]}x{mask.shape[0]}; --init_image is {init.shape[1]}x"
                             f"{init.shape[0]} (they must be the same size)")
    return {"prompts": prompts, "negative_prompt": FLAGS.negative_prompt, "init_image": init,
            "strength": FLAGS.strength, "mask": mask, "resample": FLAGS.resample,
            "lora": None if FLAGS.lora is None else _read_lora(FLAGS.lora), "lora_scale": FLAGS.lora_scale,
            "height": FLAGS.height, "width": FLAGS.width}


def _parse_labels(text: str):
    value = text.strip().lower()
    if value in ("all", "none"):
        return None if value == "none" else "all"
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--labels must be 'all', 'none' or comma-separated class numbers; got {text!r}") from None


def _mesh(values) -> tuple[int, int]:
    """--mesh as ``(data, fsdp)`` device counts, checked by training.mesh's rule (one line naming the flag)."""
    import jax

    from ddim_jax.config import mesh_shape

    shape = tuple(int(v) if v.strip().lstrip("+-").isdigit() else v for v in values)
    try:
        return mesh_shape(shape, jax.device_count())
    except ValueError as e:  # "training.mesh must be (data, fsdp): ...; got (3, 2)"
        raise ValueError("--mesh" + str(e).removeprefix("training.mesh")) from None


def _int_list(name, values) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be integers; got {','.join(values)}") from None


# ---------------------------------------------------------------------------------------------
# The output directory.


@contextlib.contextmanager
def claim_output(out: str):
    """Holds the output directory ``out`` while a run writes there: an ``flock`` on ``out/.sample.lock`` (the
    kernel drops it if the process dies), so a second run on the same directory is refused at once instead
    of both sampling and the later one replacing the other's files. On leaving, the lock file goes, and so
    do the directories this claim created if nothing was written into them (a run that failed)."""
    from ddim_jax import files

    out = os.path.abspath(out)
    created, d = [], out  # the directories the claim creates, innermost first
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    lock = files.WorkdirLock(out, ".sample.lock")
    try:
        try:
            lock.acquire()
        except files.WorkdirInUse:
            raise FileExistsError(f"--output {out} is being written by {lock.holder()}; wait for it to finish or "
                                  "choose another --output") from None
        try:
            yield out
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.path)  # while held: a run starting now makes a lock file of its own
            lock.release()
    finally:
        for d in created:  # those still empty: nothing was written there
            try:
                os.rmdir(d)
            except OSError:
                break


def _refuse_existing(paths, overwrite: bool) -> None:
    """Existing outputs are kept unless --overwrite (they are then replaced atomically)."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (and {len(existing) - 1} more); pass --overwrite or choose "
                              "another --output")


def reference_name(data: dict) -> str:
    """The cache name of a training set's reference statistics: everything that changes its images
    (dataset, folder, image size, channels, crop, the classes kept), so statistics of other images are never
    reused."""
    classes = data.get("classes")
    subset = "" if classes is None else "-classes" + "_".join(str(k) for k in sorted(classes))
    if data["dataset"] == "digits":  # 8x8, or upscaled to data.image_size
        size = data.get("image_size", 8)
        return ("digits-train" if size == 8 else f"digits-train-{size}px") + subset
    where = data.get("folder", "") if data["dataset"] == "folder" else ""
    tag = f"{data['dataset']}{'-' + where.strip('/').replace('/', '_') if where else ''}-train"
    return f"{tag}-{data['image_size']}px-{data.get('channels', 3)}ch-{data.get('crop', 'center')}{subset}"


def _dataset_images(model, split, num, data_dir=None):
    """uint8 images of the model's training dataset (``split``) as training saw them (size, channels), at
    most ``num``; ``data_dir``: tfds' (--data_dir)."""
    import ml_collections

    from ddim_jax import data as data_lib

    d = model.data
    if not d:
        raise ValueError("this mode needs the training data, which a converted checkpoint does not name; "
                         "use --workdir")
    d = dict(d, split=split, **({"data_dir": data_dir} if data_dir else {}))
    src = data_lib.make_source(ml_collections.ConfigDict(d))
    return src.get(range(min(num, len(src))))


# ---------------------------------------------------------------------------------------------
# The modes: each computes on every process and writes its files (atomically) on process 0.


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _grid(images, path, ncol=None):
    from ddim_jax.images import save_grid

    save_grid(images, path, ncol=ncol, scale=max(1, 64 // images.shape[2]))


def run_sample(model, s: Settings, paths):
    """Exactly N samples streamed to samples.npy (uint8 [N, H, W, C]) and the first 100 as samples.png."""
    import numpy as np

    from ddim_jax import experiments as ex
    from ddim_jax import files
    from ddim_jax.parallel import on_main

    npy_path, grid_path, labels_path = paths
    out = os.path.dirname(npy_path)
    shape = (s.num, model.image_size, model.image_size, model.channels)
    size = int(np.prod(shape, dtype=np.int64))

    def check_disk():
        if size > files.free_disk(out) - (64 << 20):
            raise ValueError(f"--num_samples={s.num} needs {size / 2**30:.1f} GiB in {out}; "
                             f"{files.free_disk(out) / 2**30:.1f} GiB are free")

    on_main(check_disk, "checking the disk")
    # A concat-conditioned model samples from held-out images' observations.
    sources = None if model.spec.concat is None else _dataset_images(model, "test", s.num, s.data_dir)
    batches = ex.sample_batches(model, s.num, s.batch_size, s.steps, solver=s.solver, eta=s.eta,
                                sigma_hat=s.sigma_hat, spacing=s.spacing, seed=s.seed, sources=sources,
                                **s.cond(model))
    if not _is_main():  # every process takes part in the sharded sampling; process 0 writes
        for _ in batches:
            pass
        return
    first = []
    with files.atomic_path(npy_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for start, imgs in batches:
            arr[start:start + len(imgs)] = imgs
            first.extend(imgs[:100 - len(first)])
        arr.flush()
        del arr
    if sources is None:
        _grid(np.stack(first), grid_path)
    else:  # what the model was given, its samples, the held-out images they came from
        k = min(10, len(first))
        _grid(np.concatenate([_observed(model, sources[:k]), np.stack(first[:k]), sources[:k]]), grid_path, ncol=k)
    labels = ex.class_labels(model, s.cond(model)["labels"], s.num)
    if labels is not None:
        files.atomic_write(labels_path, lambda f: np.save(f, labels))
    grid = "a grid" if sources is None else "a grid (rows: the observations, the samples, the originals)"
    print(f"wrote {s.num} samples to {npy_path}{'' if labels is None else ' (their labels in labels.npy)'} and "
          f"{grid} to {grid_path}")


def _observed(model, images):
    """uint8 pictures of what a concat-conditioned model is given of ``images`` (at their size)."""
    import numpy as np

    from ddim_jax import concat
    from ddim_jax.images import from_uint8, to_uint8

    cond = concat.get(model.spec.concat)
    x = from_uint8(images)
    return to_uint8(np.asarray(cond.condition(cond.observe(x), images.shape[1]))[..., :images.shape[-1]])


def _grid_mode(compute, caption):
    """A mode drawing ``compute(experiments, model, settings)``, a grid ``[rows, columns, H, W, C]``."""

    def run(model, s: Settings, paths):
        from ddim_jax import experiments as ex

        grid = compute(ex, model, s)
        if _is_main():
            _grid(grid.reshape((-1,) + grid.shape[2:]), paths[0], ncol=grid.shape[1])
            print(f"{caption(s)}wrote {paths[0]}")

    return run


def run_reconstruction(model, s: Settings, paths):
    import numpy as np

    from ddim_jax import experiments as ex
    from ddim_jax import files

    json_path, grid_path = paths
    images = _dataset_images(model, "test", s.num, s.data_dir)
    errors, recons = ex.reconstruction(model, images, s.steps_list, s.batch_size, spacing=s.spacing)
    if _is_main():
        k, rows = min(len(images), 10), list(errors)  # each S, then a latent model's autoencoder alone
        _grid(np.concatenate([images[:k]] + [recons[r][:k] for r in rows]), grid_path, ncol=k)
        files.write_json(json_path, {"num_images": len(images), "spacing": s.spacing or "uniform",
                                     "mse_per_dim_0_1": {str(r): e for r, e in errors.items()}})
        print("| S | " + " | ".join(map(str, rows)) + " |")
        print("|---" * (len(rows) + 1) + "|")
        print("| MSE | " + " | ".join(f"{errors[r]:.2e}" for r in rows) + " |")
        extra = "; last row: the autoencoder alone" if "autoencoder" in errors else ""
        print(f"wrote {json_path} and {grid_path} (first row: originals; then one row per S{extra})")


def run_fid(model, s: Settings, paths):
    from ddim_jax import experiments as ex
    from ddim_jax import fid as fid_lib
    from ddim_jax import files

    json_path, md_path, plot_path = paths
    stats = fid_lib.load_stats(s.fid_stats) if s.fid_stats else None
    feat_name = s.features or ("digits" if model.data.get("dataset") == "digits" else "inception")
    extractor = (fid_lib.feature_extractor("inception", weights=s.inception_weights)
                 if feat_name == "inception" else fid_lib.feature_extractor(feat_name))
    if stats:
        mu, sigma, _ = stats
        if mu.shape != (extractor.dim,):
            raise ValueError(f"--fid_stats {s.fid_stats} holds {len(mu)}-d statistics; {extractor.name} features "
                             f"are {extractor.dim}-d (--features)")
    else:
        if not model.data:
            raise ValueError("--fid_stats is required for a model that does not name its training data "
                             "(a converted checkpoint)")
        mu, sigma = fid_lib.reference_stats(reference_name(model.data),
                                            lambda: _dataset_images(model, "train", 10**9, s.data_dir), extractor)
    rows = ex.fid_table(model, extractor, (mu, sigma), s.num, s.batch_size, s.fid_steps, s.fid_etas,
                        spacing=s.spacing, solvers=s.fid_solvers, seed=s.seed, **s.cond(model))
    if _is_main():
        table = ex.format_fid_table(rows)
        files.write_json(json_path, {"features": extractor.name, "spacing": s.spacing, "labels": s.labels_text,
                                     "guidance": s.guidance, "rows": rows})
        cond = f", labels {s.labels_text}, guidance {s.guidance}" if model.num_classes is not None else ""
        spacing = f"{s.spacing} spacing" if s.spacing else "each solver's default spacing"
        files.write_text(md_path, f"FID ({extractor.name} features, {s.num} samples, {spacing}{cond})\n\n"
                                  f"{table}\n")
        ex.plot_fid(rows, plot_path)
        print(table)
        print(f"wrote {json_path}, {md_path}, {plot_path}")


def _pipeline_mode(call):
    """A mode running a Stable Diffusion pipeline (:mod:`ddim_jax.pipelines`) through ``call(pipelines, spec,
    params, settings, images, latents, options)`` on one device: one image per prompt (cycled to --num_samples),
    or --num_samples (default 8) images of a model without text; written as PNGs in images/, a grid and, with
    prompts, prompts.txt."""

    def run(model, s: Settings, paths):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from PIL import Image

        from ddim_jax import experiments as ex
        from ddim_jax import files, models, pipelines
        from ddim_jax.images import from_uint8, to_uint8

        images_dir, grid_path, prompts_path = paths
        params = s.params(model)  # on one device, with --lora merged
        shape = (*pipelines.latent_size(model.spec, s.height, s.width), model.sample_shape[-1])  # x_T's
        text = s.prompts is not None
        n = s.num or (len(s.prompts) if text else 8)
        rows = [s.prompts[i % len(s.prompts)] for i in range(n)] if text else None
        labels = None if text else ex.class_labels(model, s.cond(model)["labels"], n)
        tokenizer = models.load_tokenizer(s.model_path) if text else None
        guidance = s.guidance if s.guidance is not None else (7.5 if text else None)
        init = None
        if s.init_image is not None:
            init = from_uint8(s.init_image if model.channels == 3 else s.init_image.mean(-1, keepdims=True).round())
        out = []
        for start in range(0, n, s.batch_size):
            count = min(s.batch_size, n - start)
            opts = {"guidance": guidance, "num_steps": s.steps, "solver": s.solver, "spacing": s.spacing,
                    "eta": s.eta, "seed": s.seed + start, "dtype": s.dtype}
            if text:
                opts["context"], opts["null_context"] = pipelines.encode_prompts(
                    model.spec, params, tokenizer, rows[start:start + count], s.negative_prompt)
            elif labels is not None:
                opts["labels"] = labels[start:start + count]
            latents = np.asarray(jax.vmap(lambda i: jax.random.normal(  # image i's x_T: fold_in(key(seed), i)
                jax.random.fold_in(jax.random.key(s.seed), i), shape))(jnp.arange(start, start + count)))
            images = None if init is None else np.repeat(init[None], count, axis=0)
            out.append(to_uint8(call(pipelines, model.spec, params, s, images, latents, opts)))
        if not _is_main():
            return
        out = np.concatenate(out)
        with files.replace_dir(images_dir, overwrite=s.overwrite) as tmp:
            for i, img in enumerate(out):
                picture = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
                files.atomic_write(os.path.join(tmp, f"{i:05d}.png"), lambda f, p=picture: p.save(f, format="PNG"))
        _grid(out[:100], grid_path)
        if text:
            files.write_text(prompts_path, "".join(f"{i:05d}.png\t{p}\n" for i, p in enumerate(rows)))
        print(f"wrote {n} images to {images_dir} and a grid to {grid_path}"
              + (f" (their prompts in {prompts_path})" if text else ""))

    return run


@dataclasses.dataclass(frozen=True)
class Mode:
    """One --mode: ``run(model, settings, paths)`` computes on every process and writes ``paths`` (its
    ``outputs`` in the output directory) on process 0; the fields say which flags it takes."""

    run: Callable
    outputs: tuple[str, ...]  # every file it may write: refused when present, unless --overwrite
    num_samples: int = 64  # the default --num_samples
    step_flags: tuple[str, ...] = ("steps",)  # its step counts, checked against the model's T
    solvers: bool = True  # takes --solver (else it is DDIM's: its trajectory, its encoder)
    labels: bool = True  # takes --labels and --guidance
    concat: bool = False  # offered for a concat-conditioned model
    prompts: bool = False  # a pipeline mode: takes --prompt, --prompts_file and --negative_prompt
    init_image: bool = False  # takes (and needs) --init_image, and --strength
    mask: bool = False  # takes (and needs) --mask, and --resample
    lora: bool = False  # takes --lora and --lora_scale (a LoRA merged into a Stable Diffusion model's params)
    size: bool = False  # takes --height and --width (the images' size)


_PIPELINE_OUTPUTS = ("images", "grid.png", "prompts.txt")
MODES = {
    "sample": Mode(run_sample, ("samples.npy", "samples.png", "labels.npy"), concat=True),
    "consistency": Mode(  # Figure 4: the same x_T decoded with each S
        _grid_mode(lambda ex, m, s: ex.consistency(m, min(s.num, 8), s.steps_list, seed=s.seed, spacing=s.spacing,
                                                   solver=s.solver, **s.cond(m)),
                   lambda s: f"rows: S = {', '.join(map(str, s.steps_list))}; "),
        ("consistency.png",), step_flags=("steps", "steps_list")),
    "interpolation": Mode(  # Figure 5: slerp between pairs of x_T
        _grid_mode(lambda ex, m, s: ex.interpolation(m, max(1, min(s.num, 16) // 2), 11, s.steps, seed=s.seed,
                                                     spacing=s.spacing, solver=s.solver, **s.cond(m)),
                   lambda s: ""),
        ("interpolation.png",)),
    "sequence": Mode(  # the predicted x0 along the trajectory
        _grid_mode(lambda ex, m, s: ex.sequence(m, min(s.num, 8), s.steps, seed=s.seed, spacing=s.spacing,
                                                **s.cond(m)),
                   lambda s: f"rows: samples; columns: predicted x0 along {s.steps} steps, then the sample; "),
        ("sequence.png",), solvers=False),
    "reconstruction": Mode(run_reconstruction, ("reconstruction.json", "reconstruction.png"),
                           step_flags=("steps", "steps_list"), solvers=False, labels=False),
    "fid": Mode(run_fid, ("fid.json", "fid.md", "fid.png"), num_samples=50_000, step_flags=("steps", "fid_steps")),
    # Stable Diffusion's pipelines (ddim_jax.pipelines): prompts for a text-conditioned model, labels otherwise.
    "text2img": Mode(_pipeline_mode(lambda p, spec, params, s, x, z, o: p.text_to_image(
        spec, params, latents=z, height=s.height, width=s.width, **o)),
        _PIPELINE_OUTPUTS, num_samples=0, prompts=True, lora=True, size=True),
    "img2img": Mode(_pipeline_mode(lambda p, spec, params, s, x, z, o: p.image_to_image(
        spec, params, x, strength=0.8 if s.strength is None else s.strength, **o)),
        _PIPELINE_OUTPUTS, num_samples=0, prompts=True, init_image=True, lora=True),
    "inpaint": Mode(_pipeline_mode(lambda p, spec, params, s, x, z, o: p.inpaint(
        spec, params, x, s.mask, latents=z, strength=1.0 if s.strength is None else s.strength,
        resample=s.resample, **o)),
        _PIPELINE_OUTPUTS, num_samples=0, prompts=True, init_image=True, mask=True, concat=True, lora=True),
}


def run():
    import jax

    from ddim_jax import loading
    from ddim_jax.parallel import on_main

    s = Settings.from_flags()  # flag errors before loading anything
    model = loading.load_model(s.model_path, step=s.step, dtype=s.dtype, mesh=s.mesh)
    s = s.for_model(model)
    s.check_model(model)
    mode = MODES[s.mode]
    paths = [os.path.join(s.out, name) for name in mode.outputs]
    data, fsdp = model.mesh.devices.shape
    print(f"model: {model.source}; {jax.device_count()} {jax.devices()[0].platform} device(s) (mesh data {data} x "
          f"fsdp {fsdp}), {jax.process_count()} process(es)", flush=True)
    with contextlib.ExitStack() as claim:  # process 0 writes, so it alone holds the output directory
        on_main(lambda: claim.enter_context(claim_output(s.out)), "claiming --output")
        on_main(lambda: _refuse_existing(paths, s.overwrite), "checking --output")
        mode.run(model, s, paths)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from ddim_jax.cache import enable_compilation_cache

    enable_compilation_cache(FLAGS.compile_cache)
    try:
        run()
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing, unreadable, read-only or full
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)

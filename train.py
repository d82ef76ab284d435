"""Trains a DDPM/DDIM noise-prediction UNet (or a latent-diffusion autoencoder), data-parallel over every
device of every host; with ``training.mesh = (data, fsdp)`` the parameters, EMA and Adam state are split
over ``fsdp`` devices (FSDP).

    python train.py                                   # the embedded digits default, into runs/digits
    python train.py --config=configs/paper.py:cifar10 --config.training.batch_size=256   # into runs/cifar10
    python train.py --config=configs/autoencoder_digits.py   # an f = 4 KL autoencoder, into runs/autoencoder_digits
    python train.py --config=configs/paper.py:lsun_church256 --config.training.mesh="(-1,4)"   # FSDP over 4 devices

A run resumes from the newest checkpoint in its workdir. On a TPU pod, run the same command on
every host with --multihost.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "digits.py"), "Training config file.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples). Default: runs/<config name>.")
flags.DEFINE_bool("override_config", False, "Continue a run in --workdir even if its saved config differs.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, SLURM: auto-detected).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process run.")
flags.DEFINE_string("compile_cache", None, "Persistent compilation cache directory ('' = off; default: "
                    "$JAX_COMPILATION_CACHE_DIR or ~/.cache/ddim_jax/jax).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    if FLAGS.coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") and FLAGS.num_processes:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()
    from ddim_jax.cache import enable_compilation_cache
    from ddim_jax.training import train
    from ddim_jax.training.checkpoints import quiet_failed_saves

    enable_compilation_cache(FLAGS.compile_cache)
    quiet_failed_saves()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config_file = flags.FLAGS["config"].config_filename
    path, _, setup = config_file.partition(":")
    workdir = FLAGS.workdir or os.path.join("runs", setup or os.path.splitext(os.path.basename(path))[0])
    try:
        train(FLAGS.config, workdir, allow_config_change=FLAGS.override_config)
    except (ValueError, OSError, RuntimeError, FloatingPointError, ImportError) as e:  # OSError: a full disk, ...
        raise SystemExit(f"error: {(str(e).splitlines() or [''])[0]}") from None
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C (the first one saves and stops the loop)
        raise SystemExit("interrupted: nothing saved since the last checkpoint") from None


def parse_flags(argv):
    """absl's parser, with a bad ``--config.X`` override (an unknown field, a value of the wrong type)
    reported in one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise SystemExit(f"error: {lines[0] if len(lines) == 1 else lines[-1]}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        lines = [x.strip() for x in str(e).replace("\\n", "\n").splitlines() if x.strip()]
        msg = " ".join(lines[-2:] if isinstance(e, AttributeError) else lines[-1:]).replace("\\'", "")
        raise SystemExit(f"error: bad --config: {msg}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

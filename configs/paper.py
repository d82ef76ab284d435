"""The DDPM/DDIM setups of the paper, one per dataset: ``--config=configs/paper.py:cifar10``.

    cifar10          32x32, the 35.7M-parameter UNet, batch 128, lr 2e-4, 800k steps
    celeba64         64x64, the DDIM code's 128x128 face crop resized to 64, ch_mult (1, 2, 2, 2, 4)
    lsun_church256   256x256 center crop, ch_mult (1, 1, 2, 2, 4, 4), batch 64, lr 2e-5, 1.2M steps
    lsun_bedroom256  the same architecture, 2.4M steps
"""

from ddim_jax.config import paper_config

SETUPS = {
    "cifar10": dict(dataset="cifar10", image_size=32, ch_mult=(1, 2, 2, 2), crop="none", dropout=0.1,
                    batch_size=128, num_steps=800_000, lr=2e-4),
    "celeba64": dict(dataset="celeb_a", image_size=64, ch_mult=(1, 2, 2, 2, 4), crop="celeba", dropout=0.1,
                     batch_size=128, num_steps=500_000, lr=2e-4),
    "lsun_church256": dict(dataset="lsun/church_outdoor", image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), crop="center",
                           dropout=0.0, batch_size=64, num_steps=1_200_000, lr=2e-5),
    "lsun_bedroom256": dict(dataset="lsun/bedroom", image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), crop="center",
                            dropout=0.0, batch_size=64, num_steps=2_400_000, lr=2e-5),
}


def get_config(setup: str = "cifar10"):
    if setup not in SETUPS:
        raise ValueError(f"configs/paper.py takes one of {', '.join(SETUPS)} (e.g. configs/paper.py:cifar10); "
                         f"got {setup!r}")
    s = dict(SETUPS[setup])
    return paper_config(s.pop("dataset"), s.pop("image_size"), s.pop("ch_mult"), **s)

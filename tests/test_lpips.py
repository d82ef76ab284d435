"""LPIPS (VGG16) from local weights: against an LPIPS written here in torch from the paper's definition (and
the lpips package's ScalingLayer and normalize_tensor), the loader's layouts and refusals, the autoencoder
objective's perceptual term against a by-hand loss, and a run that records and checks its weights."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params
from test_autoencoder_training import ae_config

from ddim_jax import lpips, training
from ddim_jax.config import spec_from_config, validate_config
from ddim_jax.training import objectives
from ddim_jax.training import run as run_lib
from ddim_jax.training.run import build

torch = pytest.importorskip("torch")
nn = torch.nn


def torch_vgg16_features():
    """torchvision's ``vgg16().features`` layout (conv indices 0, 2, 5, ...; ReLU and max pools between),
    with He-normal weights so the activations keep their scale through 13 random layers."""
    layers, cin = [], 3
    for b, block in enumerate(lpips.BLOCKS):
        if b:
            layers.append(nn.MaxPool2d(2, 2))
        for ch in block:
            conv = nn.Conv2d(cin, ch, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight)
            nn.init.normal_(conv.bias, std=0.1)
            layers += [conv, nn.ReLU()]
            cin = ch
    layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class TorchLPIPS(nn.Module):
    """LPIPS v0.1 (lpips=True, spatial=False) on a VGG16 trunk: ImageNet scaling for [-1, 1] inputs, the
    ReLU outputs at features[3, 8, 15, 22, 29] (relu1_2 .. relu5_3), unit-normalised over channels, squared
    differences weighted by 1x1 convs without bias, averaged over positions and summed over layers."""

    def __init__(self, features, heads):
        super().__init__()
        self.features, self.heads = features, heads
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.features[:30]):  # up to relu5_3
            x = layer(x)
            if i in (3, 8, 15, 22, 29):
                out.append(x)
        return out

    def forward(self, x, y):
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        fx, fy = self.taps((x - self.shift) / self.scale), self.taps((y - self.shift) / self.scale)
        norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)  # noqa: E731
        return sum(self.heads[i]((norm(a) - norm(b)) ** 2).mean(dim=(2, 3)) for i, (a, b) in
                   enumerate(zip(fx, fy))).reshape(-1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random VGG16 weights saved as torchvision's state dict (.pth, with a classifier the loader ignores)
    and random non-negative heads saved as the lpips package's vgg.pth keys (.safetensors)."""
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    features = torch_vgg16_features()
    heads = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in lpips.FEATURE_CHANNELS)
    for h in heads:
        nn.init.uniform_(h.weight, 0.0, 0.5)
    d = tmp_path_factory.mktemp("lpips")
    vgg_sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save({**vgg_sd, "classifier.0.weight": torch.zeros(2, 3)}, d / "vgg16.pth")
    save_file({f"lin{i}.model.1.weight": h.weight.detach().numpy() for i, h in enumerate(heads)},
              str(d / "heads.safetensors"))
    return d / "vgg16.pth", d / "heads.safetensors", TorchLPIPS(features, heads).eval()


@pytest.mark.parametrize("shape", [(2, 40, 24, 3), (2, 16, 16, 1)])
def test_lpips_matches_torch(weights, shape):
    vgg, heads, ref = weights
    params = lpips.load_params(str(vgg), str(heads))
    rng = np.random.default_rng(shape[1])
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=shape), -1, 1).astype(np.float32)
    tx, ty = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, y))
    ty.requires_grad_(True)
    want = ref(tx, ty)
    (want_grad,) = torch.autograd.grad(want.sum(), ty)

    @jax.jit
    def value_and_grad(params, x, y):
        d, vjp = jax.vjp(lambda y: lpips.distance(params, x, y), y)
        return d, vjp(jnp.ones_like(d))[0]

    got, got_grad = value_and_grad(params, x, y)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=2e-5)
    g = want_grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got_grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
    assert np.all(np.asarray(value_and_grad(params, x, x)[0]) < 1e-6 * got.min())  # 0 up to float32 rounding


def test_normalisation_has_a_gradient_at_zero_features():
    # A position whose ReLU outputs are all 0: LPIPS' f / (||f|| + eps) has an infinite sqrt derivative there.
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([1.0, 2.0, 0.0, 0.5]))
    c = jnp.arange(16.0).reshape(1, 2, 2, 4)
    naive = lambda f: f / (jnp.sqrt(jnp.sum(f ** 2, -1, keepdims=True)) + lpips.EPS)  # noqa: E731
    assert not np.all(np.isfinite(jax.grad(lambda f: jnp.sum(naive(f) * c))(f)))
    grad = jax.grad(lambda f: jnp.sum(lpips._normalize(f) * c))(f)
    np.testing.assert_allclose(lpips._normalize(f), naive(f), rtol=1e-7)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0, 0, 0], jax.grad(lambda v: jnp.sum(naive(v) * c[0, 0, 0]))(f[0, 0, 0]),
                               rtol=1e-6)


def test_the_lpips_package_layout_in_one_file(weights, tmp_path):
    """The lpips package's own state dict (net.slice<k>.<i>.*, lin<l>.* and lins.<l>.*) is read as both files."""
    vgg, heads, ref = weights
    sd = {}
    for k, v in ref.features.state_dict().items():
        i = int(k.split(".")[0])
        sd[f"net.slice{1 + sum(i > t for t in (3, 8, 15, 22))}.{k}"] = v
    for i, h in enumerate(ref.heads):
        sd[f"lin{i}.model.1.weight"] = sd[f"lins.{i}.model.1.weight"] = h.weight.detach()
    torch.save(sd, tmp_path / "lpips_full.pth")
    one = lpips.load_params(str(tmp_path / "lpips_full.pth"), str(tmp_path / "lpips_full.pth"))
    two = lpips.load_params(str(vgg), str(heads))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loader_refusals(weights, tmp_path):
    vgg, heads, ref = weights
    with pytest.raises(FileNotFoundError, match="VGG16 weights: '/nowhere/vgg16.pth' does not exist"):
        lpips.load_params("/nowhere/vgg16.pth", str(heads))
    with pytest.raises(IsADirectoryError, match="LPIPS heads: .* is a directory; name the weights file in it"):
        lpips.load_params(str(vgg), str(tmp_path))
    sd = {f"features.{k}": v for k, v in ref.features.state_dict().items() if not k.startswith("28.")}
    torch.save(sd, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match=r"truncated.pth has no VGG16 layer features.28 \(conv5_3\)"):
        lpips.load_params(str(tmp_path / "truncated.pth"), str(heads))  # ValueError: train.py's one-line errors
    with pytest.raises(ValueError, match=r"vgg16.pth has no LPIPS head lin0"):
        lpips.load_params(str(vgg), str(vgg))
    torch.save({f"lin{i}.model.1.weight": torch.ones(1, 8, 1, 1) for i in range(5)}, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match=r"lin0.model.1.weight has shape \(1, 8, 1, 1\); LPIPS' VGG head 0 is "
                                         r"\(1, 64, 1, 1\)"):
        lpips.load_params(str(vgg), str(tmp_path / "alex.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read .*junk.safetensors as a safetensors file"):
        lpips.load_params(str(vgg), str(tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="at least 16x16"):
        jax.eval_shape(lpips.distance, lpips.param_shapes(), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))


def lpips_config(weights, **training_overrides):
    vgg, heads, _ = weights
    c = ae_config(**training_overrides)
    c.loss.update(lpips_vgg16=str(vgg), lpips_heads=str(heads), perceptual_weight=0.7)
    return c


def test_the_objective_adds_the_perceptual_term(weights):
    """Loss and adaptive weight against whole-tree gradients of LDM's nll = L1 + w x LPIPS, computed here."""
    config = lpips_config(weights)
    config.loss.disc_start = 0
    obj = build(config).objective
    assert obj.frozen_shapes().keys() == {"lpips"} and "0.7 x LPIPS" in obj.summary()
    params = random_params(jax.eval_shape(obj.init, jax.random.key(0)))  # any weights: no init to compile
    frozen = {"lpips": lpips.load_params(config.loss.lpips_vgg16, config.loss.lpips_heads)}
    x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    keys = jax.random.split(jax.random.key(2), 2)
    net, ae = spec_from_config(config).build(), params["autoencoder"]
    disc = objectives.PatchDiscriminator(config.loss.disc_layers, config.loss.disc_channels)

    @jax.jit
    def by_hand(ae, frozen):
        mean, logvar = net.apply({"params": ae}, x0, method="encode")
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), mean.shape[1:]))(keys)
        rec_of = lambda ae: net.apply({"params": ae}, mean + jnp.exp(0.5 * logvar) * noise, method="decode")  # noqa: E731

        def nll(ae):  # and its two terms (each network traced once: the values come with the gradients)
            rec = rec_of(ae)
            l1, p = jnp.mean(jnp.abs(x0 - rec)), jnp.mean(lpips.distance(frozen["lpips"], x0, rec))
            return l1 + 0.7 * p, (l1, p)

        adv = lambda ae: -jnp.mean(disc.apply({"params": params["discriminator"]}, rec_of(ae)))  # noqa: E731
        last = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731
        (nll_value, (l1, p)), nll_grad = jax.value_and_grad(nll, has_aux=True)(ae)
        adv_value, adv_grad = jax.value_and_grad(adv)(ae)
        weight = 0.5 * jnp.linalg.norm(last(nll_grad)) / (jnp.linalg.norm(last(adv_grad)) + 1e-4)
        kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
        return l1, p, weight, nll_value + 1e-6 * kl / 256 + weight * adv_value

    l1, p, weight, total = by_hand(ae, frozen)
    one = lambda p, f: obj.loss(p, f, x0, None, keys, jnp.int32(0), None)[1]  # noqa: E731
    for axis in ("fsdp", "data"):  # the step's batch axes, which the objective averages over
        one = jax.vmap(one, (None, None), axis_name=axis, axis_size=1)
    m = jax.tree.map(lambda a: a[0, 0], jax.jit(one)(params, frozen))
    np.testing.assert_allclose(m["rec_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(m["p_loss"], p, rtol=1e-5)
    assert m["p_loss"] > 0.01  # LPIPS is a sizeable part of the loss, so a missing term would show
    np.testing.assert_allclose(m["d_weight"], weight, rtol=1e-3)
    np.testing.assert_allclose(m["loss"], total, rtol=1e-5)


def test_a_run_records_its_lpips_weights_and_refuses_others(weights, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    vgg, _, _ = weights
    heads = tmp_path / "heads.safetensors"
    heads.write_bytes(weights[1].read_bytes())
    # One step of two images: VGG16's backward pass, run with the tests' unoptimised XLA code, is most of a step.
    config = lpips_config(weights, num_steps=1, log_every=1, sample_every=0, batch_size=2)
    config.loss.update(disc_weight=0.0, lpips_heads=str(heads))
    workdir = tmp_path / "run"
    training.train(config, str(workdir), progress=False, devices=jax.devices()[:1])
    assert "L1 + 0.7 x LPIPS (VGG16" in capsys.readouterr().out
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["p_loss"] > 0 and np.isfinite(rows[0]["loss"])
    assert "lpips_sha256" not in json.loads((workdir / "config.json").read_text())["loss"]  # the config is input only
    saved = json.loads((workdir / run_lib.RECORD_FILE).read_text())
    assert saved["lpips_sha256"] == hashlib.sha256(vgg.read_bytes() + heads.read_bytes()).hexdigest()
    # Other heads under the same path: resuming would silently train another loss, so it is refused.
    save_file({k: v * 2 for k, v in load_file(str(heads)).items()}, str(heads))
    config.training.num_steps = 4
    with pytest.raises(ValueError, match=r"different config \(record.lpips_sha256\)"):
        training.train(config, str(workdir), progress=False, devices=jax.devices()[:1])
    # A missing file stops a new run before anything is written.
    config.loss.lpips_heads = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="LPIPS heads: .*missing.pth' does not exist"):
        training.train(config, str(tmp_path / "new"), progress=False, devices=jax.devices()[:1])
    assert not (tmp_path / "new" / "config.json").exists()


def test_an_autoencoder_without_lpips_says_so(weights):
    obj = build(ae_config()).objective
    assert obj.frozen_shapes() == {} and "no perceptual loss: no LPIPS weights given" in obj.summary()
    off = lpips_config(weights)
    off.loss.perceptual_weight = 0.0
    obj = build(off).objective
    assert obj.frozen_shapes() == {} and "no perceptual loss: loss.perceptual_weight is 0" in obj.summary()


@pytest.mark.parametrize("updates,match", [
    ({"loss.lpips_vgg16": "/some/vgg16.pth"}, "loss.lpips_heads must be given with the other LPIPS file"),
    ({"loss.lpips_heads": "/some/vgg.pth"}, "loss.lpips_vgg16 must be given with the other LPIPS file"),
    ({"loss.perceptual_weight": float("nan")}, "loss.perceptual_weight must be a finite number >= 0"),
    ({"loss.lpips_vgg16": "a", "loss.lpips_heads": "b", "data.image_size": 8},
     "data.image_size must be >= 16 with an LPIPS term"),
])
def test_bad_lpips_configs(updates, match):
    c = ae_config()
    for field, value in updates.items():
        block, name = field.split(".")
        c[block][name] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)

"""FID / KID math, the cache, the FID Inception (parity with pytorch-fid after weight conversion) and the
digits feature extractor."""

import ast
import os
import pathlib
import time

import numpy as np
import pytest

from ddim_jax import cache, digits_classifier, fid, inception

# ----------------------------------------------------------------------------------------------
# (a) FID math.


def test_fid_of_a_distribution_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert abs(fid.fid_from_features(f, f)) < 1e-6
    mu, sigma = fid.compute_stats(f)
    np.testing.assert_allclose(sigma, np.cov(f.T), rtol=1e-12)
    # A pure shift of the same samples costs exactly |delta|^2.
    delta = np.linspace(-1, 1, 16)
    assert fid.fid_from_features(f, f + delta) == pytest.approx(delta @ delta, rel=1e-6, abs=1e-6)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9)
    # The same pair in a rotated basis (full covariances, FID is rotation invariant).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got_rot = fid.fid_from_stats(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got_rot == pytest.approx(expected, rel=1e-7)
    # Wrong shapes are an error, not a broadcast.
    with pytest.raises(ValueError):
        fid.fid_from_stats(mu1, np.diag(v1), mu2[:-1], np.diag(v2[:-1]))


def test_fid_with_singular_covariances_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0  # N < F: rank-deficient covariances
    value = fid.fid_from_features(a, b)
    assert np.isfinite(value) and value > 0


# ----------------------------------------------------------------------------------------------
# (b) KID.


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
    same_mean, same_std = fid.kid(x, y, subsets=20, subset_size=300)
    shift_mean, shift_std = fid.kid(x, y + 0.5, subsets=20, subset_size=300)
    assert abs(same_mean) < 0.01
    assert shift_mean > 0.1 and shift_mean > 20 * max(abs(same_mean), same_std)
    assert fid.kid(x, y, subsets=5, subset_size=100, seed=7) == fid.kid(x, y, subsets=5, subset_size=100, seed=7)


def test_kid_unbiased_estimate_matches_explicit_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 0.3
    k = lambda a, b: (a @ b.T / 8 + 1.0) ** 3
    m = 50
    expected = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
                - 2 * k(x, y).mean())
    mean, std = fid.kid(x, y, subsets=3, subset_size=50)  # subsets of all rows: every subset is the full set
    assert mean == pytest.approx(expected, rel=1e-10) and std < 1e-12


# ----------------------------------------------------------------------------------------------
# Statistics files.


def test_stats_round_trip_and_reference_cache(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=4), np.eye(4)
    fid.save_stats(str(tmp_path / "s.npz"), mu, sigma, num_images=10, extractor="x")
    mu2, sigma2, meta = fid.load_stats(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"num_images": 10, "extractor": "x"}
    np.savez(tmp_path / "pytorch_fid_style.npz", mu=mu, sigma=sigma)  # pytorch-fid's format loads too
    assert fid.load_stats(str(tmp_path / "pytorch_fid_style.npz"))[2] == {}

    ext = fid.FeatureExtractor("meanpix", 3, lambda p, x: x.mean(axis=(1, 2)), None, channels=3)
    images = rng.integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
    calls = []
    path = str(tmp_path / "ref.npz")

    def images_fn():
        calls.append(1)
        return images

    first = fid.reference_stats("toy", images_fn, ext, path=path, batch_size=8, progress=False)
    again = fid.reference_stats("toy", images_fn, ext, path=path, batch_size=8, progress=False)
    assert len(calls) == 1  # computed once, then read from the cache
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_allclose(first[0], images.reshape(-1, 3).mean(0) / 255.0, rtol=1e-5)
    assert fid.load_stats(path)[2]["num_images"] == 20
    other = fid.FeatureExtractor("other", 3, lambda p, x: x.mean(axis=(1, 2)), None, channels=3)
    with pytest.raises(ValueError, match="meanpix"):
        fid.reference_stats("toy", images_fn, other, path=path)


def _one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    msg = str(error.value)
    assert "\n" not in msg and str(path) in msg and "allow_pickle" not in msg, msg
    return msg


def test_bad_statistics_files_are_one_line_errors_naming_them(tmp_path):
    mu, sigma = np.zeros(4), np.eye(4)
    cases = {"nan.npz": dict(mu=np.full(4, np.nan), sigma=sigma),
             "inf.npz": dict(mu=mu, sigma=np.diag([1, 1, 1, np.inf])), "nosigma.npz": dict(mu=mu), "shape.npz": dict(mu=mu, sigma=np.eye(3))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "array.npy", mu)
    for name, match in [("nan.npz", "not finite"), ("inf.npz", "not finite"), ("nosigma.npz", "mu and sigma"),
                        ("shape.npz", r"mu \(4,\) and sigma \(3, 3\)"), ("random.npz", "mu and sigma"),
                        ("empty.npz", "mu and sigma"), ("array.npy", "mu and sigma")]:
        with pytest.raises(ValueError, match=match) as e:
            fid.load_stats(str(tmp_path / name))
        _one_line_naming(e, tmp_path / name)


def test_a_broken_reference_cache_is_recomputed_with_a_warning(tmp_path, capsys):
    ext = fid.FeatureExtractor("meanpix", 3, lambda p, x: x.mean(axis=(1, 2)), None, channels=3)
    images = np.random.default_rng(1).integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    want = fid.reference_stats("toy", lambda: images, ext, path=str(path), progress=False)
    good = path.read_bytes()
    for broken in (good[:len(good) // 2], b"", np.random.default_rng(2).bytes(300)):
        path.write_bytes(broken)
        got = fid.reference_stats("toy", lambda: images, ext, path=str(path), progress=False)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(fid.load_stats(str(path))[0], want[0])  # replaced by good statistics
        err = capsys.readouterr().err
        assert f"warning: {path}" in err and "recomputing" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# The cache and the module layout.


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DDIM_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_dir() == str(tmp_path / "home" / ".cache" / "ddim_jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == str(tmp_path / "xdg" / "ddim_jax")
    monkeypatch.setenv("DDIM_JAX_CACHE", "~/mine")
    assert cache.cache_dir() == str(tmp_path / "home" / "mine")
    monkeypatch.delenv("DDIM_JAX_INCEPTION_WEIGHTS", raising=False)
    assert inception.default_weights_path() == str(tmp_path / "home" / "mine" / inception.FID_WEIGHTS_FILE)


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in the file (also inside functions) names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_inception_and_digits_classifier_never_import_fid():
    package = pathlib.Path(inception.__file__).parent
    for name in ["cache", "inception", "digits_classifier"]:
        assert "ddim_jax.fid" not in _imported_modules(package / f"{name}.py"), name
    assert {"ddim_jax.cache", "ddim_jax.inception", "ddim_jax.digits_classifier"} <= _imported_modules(
        package / "fid.py")


def test_missing_inception_weights_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as e:
        inception.load_inception_params(str(tmp_path / "absent.pth"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["junk.pth", "empty.pth", "keys.pth", "list.pth", "junk.npz", "empty.npz",
                                  "keys.npz"])
def test_bad_inception_weights_are_one_line_errors_naming_the_file(tmp_path, name):
    path = tmp_path / name
    if name.startswith("junk"):
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif name.startswith("empty"):
        path.write_bytes(b"")
    elif name == "keys.npz":
        np.savez(path, **{"Mixed_5b/branch1x1/conv/kernel": np.zeros((1, 1, 192, 64), np.float32)})
    else:
        torch = pytest.importorskip("torch")
        torch.save({"conv.weight": torch.zeros(2, 3)} if name == "keys.pth" else [1, 2], path)
    with pytest.raises(ValueError, match="FID Inception weights") as e:
        inception.load_inception_params(str(path))
    _one_line_naming(e, path)


# ----------------------------------------------------------------------------------------------
# (c) The FID Inception: parity with pytorch-fid after conversion.


def test_bilinear_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    for h, w in [(32, 32), (8, 8), (500, 333), (299, 299)]:  # up, up, down (no antialias), identity
        x = rng.uniform(size=(2, h, w, 3)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(inception.resize_bilinear(x))
        # Bit-equal interpolation weights give ~2e-7 here; 1e-5 leaves room for a torch build that does
        # not fuse the source-coordinate multiply-add. Antialiasing or align_corners errors are ~1e-1.
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def _random_fid_state_dict(keys_and_shapes, seed=0):
    """Random weights for the FID Inception, in the .pth file's naming, scaled so activations stay O(1):
    He-normal convolutions; BatchNorm gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), running mean ~ N(0, 0.2),
    running var ~ U(0.5, 2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys_and_shapes:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            sd[k] = torch.randn(shape, generator=g) * 0.2
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) * 1.5 + 0.5
        else:  # fc.weight / fc.bias of the 1008-class head: unused by the features
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return sd


def _minimal_torch_fid_inception():
    """A torchvision-free torch re-implementation of pytorch-fid's FID InceptionV3 (block 3 output),
    with the .pth file's module names. Used because pytorch-fid imports torchvision, whose PyPI wheel
    is built against CUDA torch and does not import beside the CPU torch this project pins; when
    pytorch-fid does import, test_inception_parity_with_pytorch_fid checks this against it as well."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):  # conv (no bias) -> BatchNorm(eps 1e-3, inference) -> ReLU
        def __init__(self, cin, cout, k, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg_tf(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = Conv(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
            self.branch_pool = Conv(cin, pool, 1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg_tf(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

        def forward(self, x):
            return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = Conv(cin, 192, 1)
            self.branch7x7_1 = Conv(cin, c7, 1)
            self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = Conv(cin, c7, 1)
            self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_tf(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Conv(cin, 320, 1)
            self.branch3x3_1 = Conv(cin, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_tf(x)
            return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                              self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pool)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)

        def forward(self, x):  # [N, 3, H, W] in [0, 1] -> [N, 2048]
            x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
                x = getattr(self, "Mixed_" + name)(x)
            return x.mean(dim=(2, 3))

    return Net().eval()


def _parity_images():
    # One image per path: a small one (upsampled to 299) and one already 299x299 (the identity resize). Each
    # costs the torch reference ~1 CPU-s, and a second small image would go through the same code.
    rng = np.random.default_rng(8)
    small = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    large = rng.integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    return small, large


def _torch_features(model, images):
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, list) else out
    return out.reshape(len(images), -1).numpy()


PARITY_ATOL = 1e-4  # features are O(1) here (checked below), so this is also ~1e-4 relative


@pytest.fixture(scope="module")
def inception_parity(tmp_path_factory):
    """Random FID-Inception weights as a .pth file, and our features for the parity images (computed once,
    shared by the parity tests)."""
    torch = pytest.importorskip("torch")
    reference = _minimal_torch_fid_inception()
    shapes = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    shapes += [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]  # the file's unused classifier
    state_dict = _random_fid_state_dict(shapes, seed=0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state_dict, path)
    extractor = fid.inception_feature_extractor(str(path))  # the .pth path -> load + convert
    small, large = _parity_images()
    t0 = time.perf_counter()
    ours = np.concatenate([extractor.extract(small, batch_size=1, progress=False),
                           extractor.extract(large, batch_size=1, progress=False)])
    print(f"JAX Inception features of 2 images (incl. compile): {time.perf_counter() - t0:.1f}s")
    return state_dict, ours, reference


def _check_parity(ours, ref, label):
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    print(f"{label}: max |feature| {scale:.3f}, max abs diff {err:.2e}, rel {err / scale:.2e}")
    assert ours.shape == ref.shape == (2, 2048)
    assert 0.05 < scale < 50, "random weights must keep features O(1) for the tolerance to mean something"
    assert np.abs(ref).mean() > 1e-3 and ref.std(axis=0).mean() > 1e-3  # not all dead or all equal
    assert err < PARITY_ATOL


@pytest.mark.slow
def test_inception_parity_with_torch_reference(inception_parity):
    state_dict, ours, reference = inception_parity
    reference.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    small, large = _parity_images()
    ref = np.concatenate([_torch_features(reference, small), _torch_features(reference, large)])
    _check_parity(ours, ref, "ours vs minimal torch reference")


@pytest.mark.slow
def test_inception_parity_with_pytorch_fid(inception_parity, monkeypatch):
    try:
        import pytorch_fid.inception as pfi
    except Exception as e:  # ImportError, or torchvision failing to load its C ops beside this torch
        pytest.skip(f"pytorch_fid not importable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    state_dict, ours, reference = inception_parity
    # pytorch-fid's own model with our random weights: only the weight download is replaced.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state_dict))
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    small, large = _parity_images()
    ref = np.concatenate([_torch_features(model, small), _torch_features(model, large)])
    _check_parity(ours, ref, "ours vs pytorch-fid")
    # The converter also reads pytorch-fid's wrapper naming ("blocks.2.0.branch1x1...").
    wrapped = inception.convert_state_dict(model.state_dict())
    direct = inception.convert_state_dict(state_dict)
    np.testing.assert_array_equal(wrapped["Mixed_5b"]["branch1x1"]["conv"]["kernel"],
                                  direct["Mixed_5b"]["branch1x1"]["conv"]["kernel"])
    # And the minimal reference used when pytorch-fid is absent is the same network.
    reference.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})
    ref_min = np.concatenate([_torch_features(reference, small), _torch_features(reference, large)])
    np.testing.assert_allclose(ref_min, ref, atol=1e-5, rtol=0)


def test_converter_rejects_an_incomplete_state_dict():
    torch = pytest.importorskip("torch")
    sd = {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "Conv2d_1a_3x3.bn.weight": torch.ones(32),
          "Conv2d_1a_3x3.bn.bias": torch.zeros(32), "Conv2d_1a_3x3.bn.running_mean": torch.zeros(32),
          "Conv2d_1a_3x3.bn.running_var": torch.ones(32)}
    with pytest.raises(ValueError, match="lacks"):
        inception.convert_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# (d) The digits feature extractor.


@pytest.fixture(scope="module")
def digits_extractor(tmp_path_factory, digits_cnn_cache):
    """The extractor read from a cache holding the CNN the session trained and cached (conftest.py)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DDIM_JAX_CACHE", str(digits_cnn_cache(tmp_path_factory.mktemp("ddim_jax_cache"))))
    t0 = time.perf_counter()
    ext = fid.digits_feature_extractor()
    print(f"digits extractor ready in {time.perf_counter() - t0:.1f}s")
    yield ext
    mp.undo()


def test_digits_classifier_is_accurate_and_cached(digits_extractor, monkeypatch):
    assert digits_extractor.test_accuracy > 0.95
    cached = os.listdir(cache.cache_dir())
    assert cached and all(f.endswith(".npz") for f in cached)  # the trained weights, no temporary files

    def no_training(*a, **k):
        raise AssertionError("retrained although the weights are cached")

    monkeypatch.setattr(digits_classifier, "train_digits_classifier", no_training)
    again = fid.digits_feature_extractor()  # read from the cache
    assert again.test_accuracy == digits_extractor.test_accuracy
    images, _ = digits_classifier.digits_data("test")
    np.testing.assert_array_equal(again.extract(images[:40], progress=False),
                                  digits_extractor.extract(images[:40], progress=False))


def test_a_broken_digits_cnn_cache_is_retrained_with_a_warning(tmp_path, monkeypatch, capsys):
    import jax

    monkeypatch.setenv("DDIM_JAX_CACHE", str(tmp_path))
    trained = []

    def quick_training():  # stands in for the few seconds of real training
        trained.append(1)
        images = np.zeros((1, 8, 8, 1), np.float32)
        return jax.device_get(digits_classifier.DigitsCNN().init(jax.random.key(len(trained)), images)["params"]), 0.5

    monkeypatch.setattr(digits_classifier, "train_digits_classifier", quick_training)
    first, _ = digits_classifier.load_digits_classifier(verbose=False)
    (path,) = tmp_path.iterdir()
    good = path.read_bytes()
    np.savez(tmp_path / "other.npz", __accuracy__=0.9, **{"features/kernel": np.zeros((3, 3))})
    for broken in (good[:len(good) // 2], b"", (tmp_path / "other.npz").read_bytes()):
        path.write_bytes(broken)
        params, acc = digits_classifier.load_digits_classifier(verbose=False)
        assert acc == 0.5 and jax.tree.structure(params) == jax.tree.structure(first)
        err = capsys.readouterr().err
        assert f"warning: {path}" in err and "recomputing" in err and len(err.strip().splitlines()) == 1
        assert digits_classifier.load_digits_classifier(verbose=False)[1] == 0.5  # the cache was replaced
    assert len(trained) == 4


def test_digits_fid_separates_real_digits_from_noise(digits_extractor):
    train, _ = digits_classifier.digits_data("train")
    test, _ = digits_classifier.digits_data("test")
    noise = np.random.default_rng(9).integers(0, 256, size=test.shape, dtype=np.uint8)
    f_train = digits_extractor.extract(train, batch_size=500, progress=False)
    f_test = digits_extractor.extract(test, batch_size=500, progress=False)
    f_noise = digits_extractor.extract(noise, batch_size=500, progress=False)
    assert f_train.shape == (1500, digits_classifier.DIGITS_FEATURE_DIM)
    fid_real = fid.fid_from_features(f_train, f_test)
    fid_noise = fid.fid_from_features(f_test, f_noise)
    print(f"digits FID train vs test {fid_real:.3f}, test vs noise {fid_noise:.3f}")
    # ~11x with 297 test digits; most of fid_real is the finite-sample bias of FID.
    assert fid_noise > 5 * fid_real
    kid_real = fid.kid(f_train, f_test, subsets=10, subset_size=297)[0]
    kid_noise = fid.kid(f_test, f_noise, subsets=10, subset_size=297)[0]
    assert kid_noise > 3 * abs(kid_real)  # ~7x: train and test digits come from different writers
    # Dropping half of the classes (a mode-dropping generator) is seen too (~4x).
    _, labels = digits_classifier.digits_data("test")
    assert fid.fid_from_features(f_train, f_test[labels < 5]) > 2 * fid_real


def test_digits_features_read_upscaled_digits_at_8x8(digits_extractor):
    # A latent model of the upscaled digits generates 32x32 images: each 4x4 block's mean is the 8x8 pixel.
    test, _ = digits_classifier.digits_data("test")
    big = np.repeat(np.repeat(test[:40], 4, axis=1), 4, axis=2)
    np.testing.assert_array_equal(fid.box_downsample(big, 8), test[:40])
    np.testing.assert_allclose(digits_extractor.extract(big, progress=False),
                               digits_extractor.extract(test[:40], progress=False), rtol=1e-6)
    with pytest.raises(ValueError, match="digits_cnn features need 8x8 images; got 12x12"):
        digits_extractor.extract(np.zeros((2, 12, 12, 1), np.uint8), progress=False)

"""The bi-level search step: Eq. 8's hypergradient, finite difference vs exact, BN, a toy search,
the BatchNorm-statistics path, the normalized policy optimizer and the signal metrics."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from autopose.augment import RelaxedPolicy, SearchSpace, TemperatureSchedule, ops, p2net_space
from autopose.data.codec import HeatmapCodec
from autopose.engine.search import (
    BilevelSearch,
    NormalizedGradientDescent,
    frozen_batchnorm_stats,
    make_policy_optimizer,
)
from autopose.models import build_model
from autopose.models.losses import PoseLoss

H, W = 32, 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


class TinyPoseNet(nn.Module):
    """Three conv-BN-activation layers to 1/4 resolution and a heatmap head; the training
    forward returns a list like P2Net's."""

    def __init__(self, joints: int = 2, width: int = 16, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        layers, channels = [], 3
        for stride, dilation in ((1, 1), (2, 1), (2, 1), (1, 2)):
            layers += [
                nn.Conv2d(channels, width, 3, stride, dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(width),
                activation(),
            ]
            channels = width
        self.body = nn.Sequential(*layers, nn.Conv2d(width, joints, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(images)]


def weighted_mse(outputs, target, weight):
    """``PoseLoss`` computes in float32; the float64 checks below need a loss that stays float64."""
    pred = outputs[-1]
    per_joint = ((pred - target.to(pred.dtype)) ** 2).flatten(2).mean(-1)
    return 0.5 * (per_joint * weight.to(pred.dtype)).mean()


def bars(count: int, generator: torch.Generator, angle: float = 0.0):
    """Synthetic "people": a bar from a head (red dot) to a foot (green dot), near upright.

    With ``angle`` the batch is turned by the Rotate op itself (pixels and keypoints)."""
    cx = (W - 1) / 2 + (torch.rand(count, generator=generator) - 0.5) * 4
    cy = (H - 1) / 2 + (torch.rand(count, generator=generator) - 0.5) * 4
    half = 7 + torch.rand(count, generator=generator) * 2
    tilt = (torch.rand(count, generator=generator) - 0.5) * math.radians(10)
    head = torch.stack([cx + half * torch.sin(tilt), cy - half * torch.cos(tilt)], -1)
    foot = torch.stack([cx - half * torch.sin(tilt), cy + half * torch.cos(tilt)], -1)
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]

    def dot(p: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((xs - p[:, 0, None, None]) ** 2 + (ys - p[:, 1, None, None]) ** 2) / 4.5)

    along = foot - head
    px, py = xs - head[:, 0, None, None], ys - head[:, 1, None, None]
    t = (
        (px * along[:, 0, None, None] + py * along[:, 1, None, None]) / (along**2).sum(-1)[:, None, None]
    ).clamp(0, 1)
    bar = 0.5 * torch.exp(
        -((px - t * along[:, 0, None, None]) ** 2 + (py - t * along[:, 1, None, None]) ** 2) / 2
    )
    images = torch.stack([bar + dot(head), bar + dot(foot), bar], 1)
    images = (images + 0.05 * torch.rand(images.shape, generator=generator)).clamp(0, 1)
    keypoints, visibility = torch.stack([head, foot], 1), torch.full((count, 2), 2.0)
    if angle:
        images, keypoints, visibility = ops.rotate(images, keypoints, visibility, torch.full((count,), angle))
    return images, keypoints, visibility


TOY_OPS = ("Rotate", "Brightness", "Cutout", "TranslateX")


def toy_space(sub_policies: int = 1) -> SearchSpace:
    return SearchSpace("toy", sub_policies, 1, p2net_space().subset(TOY_OPS).ops)


def make_search(model, policy, dtype=torch.float32, **options) -> BilevelSearch:
    loss = weighted_mse if dtype == torch.float64 else PoseLoss(0)
    return BilevelSearch(
        model,
        policy,
        loss,
        HeatmapCodec((H, W), sigma=1.0),
        torch.optim.SGD(model.parameters(), lr=0.5),
        torch.optim.Adam(policy.parameters(), lr=0.05, betas=(0.5, 0.999)),
        unroll_lr=0.5,
        **options,
    )


def pretrain(model: nn.Module, generator: torch.Generator, steps: int) -> None:
    """Plain training on upright bars, so that the model has learned something to unroll from."""
    codec, loss = HeatmapCodec((H, W), sigma=1.0), weighted_mse
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        images, keypoints, visibility = bars(16, generator)
        heatmaps, weight = codec.encode(keypoints, visibility)
        optimizer.zero_grad()
        loss(model(images), heatmaps, weight).backward()
        optimizer.step()


def setup(
    seed: int = 0, dtype=torch.float64, activation=nn.SiLU, space=None, batch: int = 8, warmup: int = 0
):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TinyPoseNet(activation=activation)
    pretrain(model, generator, warmup)  # in float32: float64 convolutions are slow on the CPU
    model = model.to(dtype)
    policy = RelaxedPolicy(space or toy_space(2), init_magnitude=7.0, seed=seed).to(dtype)
    train = [t.to(dtype) for t in bars(batch, generator)]
    val = [t.to(dtype) for t in bars(batch, generator, angle=40.0)]
    noise = policy.sample_noise(batch, torch.Generator().manual_seed(seed + 100))
    noise = type(noise)(*(t.to(dtype) for t in (noise.sub_policy, noise.bernoulli, noise.cutout)))
    return model, policy, train, val, noise


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def unrolled_val_loss(search: BilevelSearch, train, val, noise) -> float:
    """Eq. 8's objective written out: ``L_val(w − ζ ∇w L_train(w, α))`` (batch-statistics BN)."""
    model = search.model
    names = [n for n, _ in model.named_parameters()]
    weights = list(model.parameters())
    images, heatmaps, weight = search.augment(train, noise)
    val_heatmaps, val_weight = search.codec.encode(val[1], val[2])
    with frozen_batchnorm_stats(model):
        loss = search.loss_fn(
            functional_call(model, dict(zip(names, weights, strict=True)), (images,)), heatmaps, weight
        )
        grads = torch.autograd.grad(loss, weights)
        unrolled = {n: w - search.unroll_lr * g for n, w, g in zip(names, weights, grads, strict=True)}
        return float(
            search.loss_fn(functional_call(model, unrolled, (val[0],)), val_heatmaps, val_weight).detach()
        )


def test_hypergradient_is_the_derivative_of_the_unrolled_validation_loss():
    """Eq. 8 checked against a central difference of the unrolled validation loss, for every op
    weight, probability and magnitude (the sub-policy pick is hard, so its logits' gradient is a
    straight-through estimate with no numerical counterpart). The codec's targets are float32:
    a step of 1e-3 keeps their rounding out of the difference."""
    step = 1e-3
    model, policy, train, val, noise = setup(warmup=50)
    search = make_search(model, policy, torch.float64)
    exact = search.hypergradient(train, val, noise, hessian="exact")
    detached = make_search(model, policy, torch.float64, differentiate_targets=False).hypergradient(
        train, val, noise, hessian="exact"
    )
    picks, numeric, ours, theirs = [], [], [], []
    rotate = toy_space().index("Rotate")
    for index, parameter in enumerate(policy.parameters()):
        if parameter.ndim == 1:
            continue
        positions = [(k, 0, o) for k in range(2) for o in range(len(TOY_OPS))]
        for position in positions:
            with torch.no_grad():
                parameter[position] += step
            up = unrolled_val_loss(search, train, val, noise)
            with torch.no_grad():
                parameter[position] -= 2 * step
            down = unrolled_val_loss(search, train, val, noise)
            with torch.no_grad():
                parameter[position] += step
            picks.append((index, position))
            numeric.append((up - down) / (2 * step))
            ours.append(float(exact[index][position]))
            theirs.append(float(detached[index][position]))
    numeric, ours, theirs = torch.tensor(numeric), torch.tensor(ours), torch.tensor(theirs)
    assert numeric.norm() > 0
    assert (ours - numeric).norm() / numeric.norm() < 0.01
    # With the targets detached, the gradient is that of another objective: Rotate's magnitude
    # gradient (parameter 3 = magnitude_logits) even has the opposite sign here.
    cosine = torch.nn.functional.cosine_similarity(theirs, numeric, dim=0)
    assert cosine < 0.9
    rotate_m = picks.index((3, (0, 0, rotate)))  # parameter 3: magnitude_logits
    assert theirs[rotate_m] * numeric[rotate_m] < 0


@pytest.mark.parametrize(
    ("dtype", "central", "tolerance"),
    [(torch.float32, True, 0.01), (torch.float64, True, 0.01), (torch.float32, False, 0.08)],
)
def test_finite_difference_agrees_with_exact_on_a_smooth_model(dtype, central, tolerance):
    model, policy, train, val, noise = setup(seed=1, dtype=dtype, space=p2net_space())
    search = make_search(model, policy, dtype, central=central)
    fd = flat(search.hypergradient(train, val, noise, hessian="finite_difference"))
    exact = flat(search.hypergradient(train, val, noise, hessian="exact"))
    assert torch.nn.functional.cosine_similarity(fd, exact, dim=0) > 1 - tolerance**2
    assert (fd - exact).norm() / exact.norm() < tolerance


def test_finite_difference_on_relu_needs_a_radius_that_crosses_no_switch():
    """On ReLU networks the default radius measures a secant across units switching; a small
    radius (float64) recovers the pointwise derivative — the implementation itself is exact."""
    model, policy, train, val, noise = setup(seed=2, activation=nn.ReLU, space=p2net_space())
    exact = flat(make_search(model, policy, torch.float64).hypergradient(train, val, noise, hessian="exact"))
    small = make_search(model, policy, torch.float64, fd_radius=1e-5)
    fd = flat(small.hypergradient(train, val, noise, hessian="finite_difference"))
    assert (fd - exact).norm() / exact.norm() < 1e-3


def test_one_step_gives_every_policy_parameter_a_finite_nonzero_gradient():
    model, policy, train, val, noise = setup(seed=3, dtype=torch.float32, space=p2net_space(), batch=16)
    search = make_search(model, policy)
    losses = search.step(train, val, noise)
    assert all(math.isfinite(v) for v in losses.values()) and losses["policy_grad_norm"] > 0
    for name, parameter in policy.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    assert (policy.sub_policy_logits.grad != 0).all()
    assert (policy.op_logits.grad != 0).all()
    assert (policy.probability_logits.grad != 0).all()
    equalize = p2net_space().index("Equalize")
    magnitudes = policy.magnitude_logits.grad
    assert (magnitudes[..., equalize] == 0).all()  # Equalize has no magnitude (none-in-m)
    assert (torch.cat([magnitudes[..., :equalize], magnitudes[..., equalize + 1 :]], -1) != 0).all()


def test_weight_step_and_batchnorm_match_a_plain_train_step():
    """The weights move exactly as a plain SGD step on the same augmented batch would move them,
    and the extra passes leave the BatchNorm running statistics alone."""
    model, policy, train, val, noise = setup(seed=4, dtype=torch.float32)
    plain = copy.deepcopy(model)
    search = make_search(model, policy)
    with torch.no_grad():
        images, keypoints, visibility = policy(*train, noise)
    heatmaps, weight = search.codec.encode(keypoints, visibility)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)
    search.loss_fn(plain(images), heatmaps, weight).backward()
    optimizer.step()
    search.step(train, val, noise)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_hypergradient_changes_nothing():
    model, policy, train, val, noise = setup(seed=5, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(policy.state_dict())
    make_search(model, policy).hypergradient(train, val, noise)
    for a, b in zip(model.state_dict().values(), before[0].values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(policy.state_dict().values(), before[1].values(), strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in [*model.parameters(), *policy.parameters()])


def test_step_on_a_p2net_model_with_uint8_images():
    torch.manual_seed(0)
    # One dilated bottleneck per RefineNet level, as this test was written: at make_search's toy
    # step sizes (SGD at 0.5) the paper's deeper layout diverges in the first weight step.
    model = build_model(
        "p2net_r18",
        num_joints=2,
        input_size=(H, W),
        pyramid_channels=16,
        parallel_channels=(8, 8, 8, 8),
        refine_blocks=(1, 1, 1, 1),
    )
    model.train()
    policy = RelaxedPolicy(p2net_space(), seed=0)
    generator = torch.Generator().manual_seed(0)
    images, keypoints, visibility = bars(2, generator)
    as_bytes = (images * 255).round().to(torch.uint8)
    search = make_search(model, policy)
    for hessian in ("finite_difference", "exact"):
        search.hessian = hessian
        losses = search.step((as_bytes, keypoints, visibility), bars(2, generator, angle=20.0))
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert losses["policy_grad_norm"] > 0


def test_toy_search_finds_rotation_when_validation_is_rotated():
    """Validation people are turned 40° counter-clockwise, training people are upright: the
    search raises Rotate's weight far above the other ops, and its signed value toward +40°:
    ``m`` toward +40° with sign → 1, or toward −40° with sign → 0 (the same turn, mirrored)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyPoseNet()
    policy = RelaxedPolicy(toy_space(), TemperatureSchedule(), init_magnitude=5.0, seed=0)  # m = 5: 0°
    search = make_search(model, policy)
    for _ in range(100):
        search.step(bars(16, generator), bars(16, generator, angle=40.0))
    weights = policy.op_probabilities()
    assert weights["Rotate"] > 0.6 and all(
        weights["Rotate"] > 3 * w for op, w in weights.items() if op != "Rotate"
    )
    sign = policy.sign_probabilities()["Rotate"]
    angle = toy_space().value("Rotate", policy.magnitudes()["Rotate"]) * (1.0 if sign > 0.5 else -1.0)
    assert 30.0 < angle <= 45.0 and abs(sign - 0.5) > 0.4


def test_running_statistics_let_the_search_see_a_darker_val_split():
    """With batch statistics, the validation pass normalizes away a scale every val image shares
    (conv without bias, then BatchNorm): a val split at half the brightness gives the same
    hypergradient. With ``val_batchnorm="running"`` it is normalized as evaluation normalizes
    it, and the darker split changes the hypergradient; the running statistics stay untouched."""
    model, policy, train, val, noise = setup(seed=2, dtype=torch.float64, warmup=30)
    darker = (val[0] * 0.5, val[1], val[2])
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    def relative_change(mode: str) -> float:
        search = make_search(model, policy, torch.float64, val_batchnorm=mode)
        bright, dark = (flat(search.hypergradient(train, batch, noise)) for batch in (val, darker))
        return float((bright - dark).norm() / bright.norm())

    assert relative_change("batch") < 1e-3
    assert relative_change("running") > 0.05
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="val_batchnorm"):
        make_search(model, policy, val_batchnorm="eval")


# -- the BatchNorm-statistics path ---------------------------------------------------------------------
def brightness_space() -> SearchSpace:
    return SearchSpace("bright", 1, 1, p2net_space().subset(("Brightness",)).ops)


class ConvNorm(nn.Module):
    """conv (stride 4, no bias) → BatchNorm with a known affine: the heatmaps at 1/4 resolution."""

    def __init__(self, joints: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, joints, 4, stride=4, bias=False)
        self.norm = nn.BatchNorm2d(joints)
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor([1.5, 0.7]))
            self.norm.bias.copy_(torch.tensor([0.2, -0.1]))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.norm(self.conv(images))]


def conv_norm(images, conv, gamma, beta, mean=None, variance=None, eps=1e-5):
    """ConvNorm written out; normalised by the given statistics, or by the batch's own."""
    y = torch.nn.functional.conv2d(images, conv, stride=4)
    if mean is None:
        mean, variance = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    z = (y - mean[:, None, None]) / torch.sqrt(variance[:, None, None] + eps)
    return [z * gamma[:, None, None] + beta[:, None, None]], (mean, variance)


def test_batchnorm_path_is_the_derivative_of_val_loss_under_the_augmented_statistics():
    """On conv → BatchNorm → loss, written out by hand: ``w'`` from the training gradient at
    ``w``, then ``f(α) = L_val(w'; mean and variance of conv_w'(x_aug(α)))``; its central
    difference in Brightness' magnitude and probability logits is the BN-path gradient, and
    the hypergradient with ``λ`` is Eq. 8's plus ``λ`` times it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ConvNorm().double()
    policy = RelaxedPolicy(brightness_space(), init_magnitude=7.0, seed=0).double()
    images, keypoints, visibility = bars(8, generator)
    train = (0.7 * images.double(), keypoints.double(), visibility.double())  # × 1.36 stays below 1
    val_images, val_keypoints, val_visibility = bars(8, generator)
    val = (0.5 * val_images.double(), val_keypoints.double(), val_visibility.double())
    noise = policy.sample_noise(8, torch.Generator().manual_seed(1)).to(torch.float64)
    search = make_search(model, policy, torch.float64)
    codec, zeta = search.codec, search.unroll_lr

    weights = [model.conv.weight, model.norm.weight, model.norm.bias]
    with torch.no_grad():
        augmented = policy(*train, noise)[0]
    heatmaps, weight = codec.encode(train[1], train[2])
    outputs, _ = conv_norm(augmented, *weights)
    grads = torch.autograd.grad(weighted_mse(outputs, heatmaps, weight), weights)
    unrolled = [(w - zeta * g).detach() for w, g in zip(weights, grads, strict=True)]
    val_heatmaps, val_weight = codec.encode(val[1], val[2])

    def f() -> float:
        with torch.no_grad():
            _, (mean, variance) = conv_norm(policy(*train, noise)[0], *unrolled)
            outputs, _ = conv_norm(val[0], *unrolled, mean, variance)
            return float(weighted_mse(outputs, val_heatmaps, val_weight))

    step = 1e-5
    numeric = []
    for parameter in (policy.magnitude_logits, policy.probability_logits):
        with torch.no_grad():
            parameter[0, 0, 0] += step
            up = f()
            parameter[0, 0, 0] -= 2 * step
            down = f()
            parameter[0, 0, 0] += step
        numeric.append((up - down) / (2 * step))
    numeric = torch.tensor(numeric, dtype=torch.float64)

    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    path = search.batchnorm_path_gradient(train, val, noise)
    named = dict(zip((name for name, _ in policy.named_parameters()), path, strict=True))
    ours = torch.stack([named["magnitude_logits"][0, 0, 0], named["probability_logits"][0, 0, 0]])
    assert numeric.abs().min() > 1e-4
    torch.testing.assert_close(ours, numeric, rtol=1e-6, atol=0)

    eq8 = flat(search.hypergradient(train, val, noise))
    weighted = make_search(model, policy, torch.float64, batchnorm_path=0.5)
    torch.testing.assert_close(
        flat(weighted.hypergradient(train, val, noise)), eq8 + 0.5 * flat(path), rtol=1e-9, atol=1e-12
    )
    for key, value in running.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.grad is None for p in [*model.parameters(), *policy.parameters()])
    with pytest.raises(ValueError, match="batchnorm_path"):
        make_search(model, policy, batchnorm_path=-1.0)


def test_batchnorm_path_zero_is_todays_search_exactly():
    """λ = 0 runs none of the path: the hypergradient and a whole step are bit for bit those of
    a search built without the option."""
    model, policy, train, val, noise = setup(seed=6, dtype=torch.float32, space=p2net_space(), warmup=5)
    other_model, other_policy = copy.deepcopy(model), copy.deepcopy(policy)
    default = make_search(model, policy)
    zero = make_search(other_model, other_policy, batchnorm_path=0.0)
    for a, b in zip(
        default.hypergradient(train, val, noise), zero.hypergradient(train, val, noise), strict=True
    ):
        assert torch.equal(a, b)
    first, second = default.step(train, val, noise), zero.step(train, val, noise)
    assert first == second
    for a, b in zip(
        [*model.parameters(), *policy.parameters()],
        [*other_model.parameters(), *other_policy.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)
    # and a positive λ does change it
    weighted = make_search(other_model, other_policy, batchnorm_path=1.0)
    assert not torch.equal(
        flat(weighted.hypergradient(train, val, noise)), flat(zero.hypergradient(train, val, noise))
    )


def test_balanced_paths_sum_each_term_scaled_to_unit_norm_per_policy_tensor():
    """With ``balance_paths`` the hypergradient of each policy tensor is Eq. 8's term over its norm
    plus ``λ`` times the BatchNorm term over its own norm: the oracle takes each term from a
    search that computes it alone."""
    model, policy, train, val, noise = setup(seed=6, dtype=torch.float64, space=p2net_space(), warmup=5)
    eq8 = make_search(model, policy, torch.float64).hypergradient(train, val, noise)
    path = make_search(model, policy, torch.float64).batchnorm_path_gradient(train, val, noise)
    balanced = make_search(model, policy, torch.float64, batchnorm_path=0.3, balance_paths=True)
    ours = balanced.hypergradient(train, val, noise)
    names = [name for name, _ in policy.named_parameters()]
    for name, a, b, got in zip(names, eq8, path, ours, strict=True):
        unit_a = a / a.norm() if a.norm() > 0 else a
        unit_b = b / b.norm() if b.norm() > 0 else b
        torch.testing.assert_close(got, unit_a + 0.3 * unit_b, rtol=1e-9, atol=1e-12, msg=name)
    raw = make_search(model, policy, torch.float64, batchnorm_path=0.3).hypergradient(train, val, noise)
    assert not torch.allclose(flat(raw), flat(ours))  # the plain sum is another direction


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batchnorm_path_points_brightness_toward_the_val_splits_brightness(seed):
    """Val darker than train: the BN-path gradient of Brightness' magnitude is positive (a
    descent step lowers the factor, darker); train darker than val, the same policy: negative."""
    model, _, _, _, _ = setup(seed=seed, dtype=torch.float32, warmup=30)
    policy = RelaxedPolicy(brightness_space(), init_magnitude=7.0, seed=seed)  # factor 1.36
    generator = torch.Generator().manual_seed(seed + 10)
    search = make_search(model, policy)
    noise = policy.sample_noise(16, torch.Generator().manual_seed(seed + 20))
    if getattr(noise, "sign", None) is not None:  # a policy with signed ops: run them as m says
        noise = dataclasses.replace(noise, sign=None)
    normal, other = bars(16, generator), bars(16, generator)
    darker = (0.5 * other[0], other[1], other[2])
    dark_train = (0.5 * normal[0], normal[1], normal[2])
    magnitude = [name for name, _ in policy.named_parameters()].index("magnitude_logits")
    toward_dark = search.batchnorm_path_gradient(normal, darker, noise)[magnitude][0, 0, 0]
    toward_bright = search.batchnorm_path_gradient(dark_train, other, noise)[magnitude][0, 0, 0]
    assert toward_dark > 0 > toward_bright


# -- the policy's optimizer and the signal metrics -------------------------------------------------------
def test_normalized_step_moves_each_tensor_by_lr_along_its_gradient():
    torch.manual_seed(0)
    tensors = [nn.Parameter(torch.randn(shape)) for shape in ((3,), (2, 1, 4), (2, 1, 4), (2, 1, 4), (5,))]
    grads = [
        torch.randn(3),
        1e3 * torch.randn(2, 1, 4),
        torch.zeros(2, 1, 4),
        1e-30 * torch.randn(2, 1, 4),
        None,
    ]
    for tensor, grad in zip(tensors, grads, strict=True):
        tensor.grad = grad
    before = [t.detach().clone() for t in tensors]
    optimizer = NormalizedGradientDescent(tensors, lr=0.25)
    optimizer.step()
    for index in (0, 1, 3):  # any scale, tiny ones included (no underflow), moves by exactly lr
        move = tensors[index].detach() - before[index]
        torch.testing.assert_close(move.norm(), torch.tensor(0.25), rtol=1e-6, atol=0)
        direction = grads[index].double() / grads[index].double().norm()
        torch.testing.assert_close(move.double(), -0.25 * direction, rtol=1e-5, atol=1e-7)
    assert torch.equal(tensors[2].detach(), before[2])  # zero gradient: untouched
    assert torch.equal(tensors[4].detach(), before[4])  # no gradient: untouched
    again = make_policy_optimizer("normalized", tensors, lr=0.1)
    again.load_state_dict(optimizer.state_dict())
    assert again.param_groups[0]["lr"] == 0.25
    assert isinstance(make_policy_optimizer("adam", tensors, lr=0.1, betas=(0.5, 0.9)), torch.optim.Adam)
    with pytest.raises(ValueError, match="'sgd'"):
        make_policy_optimizer("sgd", tensors, lr=0.1)


def test_step_reports_per_parameter_norms_and_the_cosine_with_the_previous_step():
    model, policy, train, val, noise = setup(seed=7, dtype=torch.float32, space=toy_space(2))
    search = make_search(model, policy)
    first = search.step(train, val, noise)
    g1 = {name: p.grad.clone() for name, p in policy.named_parameters()}
    assert "policy_grad_cosine" not in first
    for name, grad in g1.items():
        assert first[f"policy_grad_norm/{name}"] == pytest.approx(float(grad.norm()), rel=1e-6)
    parts = sum(first[f"policy_grad_norm/{name}"] ** 2 for name in g1)
    assert parts == pytest.approx(first["policy_grad_norm"] ** 2, rel=1e-5)
    second = search.step(train, val, noise)
    a = flat(g1.values()).double()
    b = flat(p.grad for p in policy.parameters()).double()
    assert second["policy_grad_cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)
    assert -1.0 <= second["policy_grad_cosine"] <= 1.0


def test_sample_alignments_are_each_samples_gradient_along_the_val_gradient():
    """``∇w L_i · v`` per training sample, by the central difference at ``w ± εv``, against each
    sample's own autograd gradient dotted with ``v`` (float64, smooth model); they sum to the
    batch gradient's (the batch loss is the samples' mean, times B)."""
    model, policy, train, val, noise = setup(seed=6, warmup=30)
    search = make_search(model, policy, torch.float64, fd_radius=1e-4)
    names, weights = search._weights()
    images, heatmaps, weight = search.augment(train, noise)
    images, heatmaps = images.detach(), heatmaps.detach()
    train_grad, _ = search._train_gradient_at_w(names, weights, images, heatmaps, weight)
    v, _ = search._unrolled_val_gradient(names, weights, train_grad, val)
    alignment = search._sample_alignments(names, weights, v, images, heatmaps, weight)
    with frozen_batchnorm_stats(model):
        outputs = model(images)  # batch statistics, as the batch loss sees them
        losses = search._per_sample_losses(outputs, heatmaps, weight)
        torch.testing.assert_close(losses.mean(), search.loss_fn(outputs, heatmaps, weight))
        expected = torch.stack(
            [flat(torch.autograd.grad(loss, weights, retain_graph=True)) @ flat(v) for loss in losses]
        )
    torch.testing.assert_close(alignment, expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(
        alignment.sum(), len(losses) * flat(train_grad) @ flat(v), rtol=1e-4, atol=1e-9
    )


def test_influence_gradient_needs_hard_draws_and_leaves_magnitudes_alone():
    model, policy, train, val, _ = setup(seed=7, dtype=torch.float32, space=p2net_space(), batch=16)
    with pytest.raises(ValueError, match="hard=True"):
        make_search(model, policy).influence_gradient(train, val)
    hard = RelaxedPolicy(p2net_space(), hard=True, seed=7)
    before = copy.deepcopy(model.state_dict())
    names = [n for n, _ in hard.named_parameters()]
    grads = dict(zip(names, make_search(model, hard).influence_gradient(train, val), strict=True))
    assert (grads["magnitude_logits"] == 0).all()
    for name in ("sub_policy_logits", "op_logits", "probability_logits"):
        assert torch.isfinite(grads[name]).all() and (grads[name] != 0).any(), name
    for a, b in zip(model.state_dict().values(), before.values(), strict=True):
        assert torch.equal(a, b)


def test_score_choices_replace_eq8_on_the_draws_and_keep_its_path_on_the_magnitudes():
    """With ``choice_gradient="score"`` the hypergradient is the score-function estimate on every
    drawn choice's logits and Eq. 8's straight-through path on the magnitudes."""
    model, _, train, val, _ = setup(seed=8, dtype=torch.float32, space=p2net_space(), batch=16)
    policy = RelaxedPolicy(p2net_space(), hard=True, seed=8)
    noise = policy.sample_noise(16, torch.Generator().manual_seed(9))
    straight = make_search(model, policy).hypergradient(train, val, noise)
    scored = make_search(model, policy, choice_gradient="score")
    mixed = scored.hypergradient(train, val, noise)
    score = scored.influence_gradient(train, val, noise)
    for (name, _), a, b, c in zip(policy.named_parameters(), mixed, straight, score, strict=True):
        torch.testing.assert_close(a, b if name == "magnitude_logits" else c, msg=name)
    with pytest.raises(ValueError, match="hard=True"):
        make_search(model, RelaxedPolicy(p2net_space(), seed=8), choice_gradient="score")


def test_pose_descriptors_of_known_point_clouds():
    """A vertical bar of points through the crop's center: centroid 0, axis (−1, 0); turned 45°
    its axis is (0, ±1) (the sign says which way); moved right by a quarter of the longer side:
    centroid x 0.5; twice as long: log spread + log 2. Points outside the crop or unlabelled do
    not count; fewer than two leave the sample invalid."""
    from autopose.engine.search import pose_descriptors

    size = (64, 48)  # H, W: half the longer side is 32 px
    center = torch.tensor([23.5, 31.5])
    along = torch.linspace(-10, 10, 5)[:, None]
    upright = center + along * torch.tensor([0.0, 1.0])
    turned = center + along * torch.tensor([math.sin(math.radians(45)), math.cos(math.radians(45))])
    moved = upright + torch.tensor([16.0, 0.0])
    longer = center + 2 * along * torch.tensor([0.0, 1.0])
    outside = upright.clone()
    outside[0] = torch.tensor([-5.0, 0.0])  # left of the crop: not counted
    lonely = upright.clone()
    keypoints = torch.stack([upright, turned, moved, longer, outside, lonely])
    visibility = torch.full((6, 5), 2.0)
    visibility[5, 1:] = 0  # one labelled point
    features, valid = pose_descriptors(keypoints, visibility, size)
    assert valid.tolist() == [True, True, True, True, True, False]
    torch.testing.assert_close(features[0, :2], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(features[0, 3:], torch.tensor([-1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(features[1, 3:].abs(), torch.tensor([0.0, 1.0]), atol=1e-5, rtol=0)
    assert features[2, 0] == pytest.approx(0.5) and features[2, 2] == pytest.approx(features[0, 2])
    assert features[3, 2] - features[0, 2] == pytest.approx(math.log(2), abs=1e-5)
    assert features[4, 1] > 0  # the top point left: the centroid moves down
    assert (features[5] == 0).all()


def test_pose_gap_is_zero_for_the_same_geometry_and_grows_with_the_turn():
    from autopose.engine.search import pose_descriptors, pose_gap

    generator = torch.Generator().manual_seed(0)
    upright = bars(16, generator)
    same = pose_gap(*(pose_descriptors(b[1], b[2], (H, W)) for b in (upright, upright)))
    assert float(same) == pytest.approx(0.0, abs=1e-9)
    gaps = [
        float(
            pose_gap(pose_descriptors(upright[1], upright[2], (H, W)), pose_descriptors(b[1], b[2], (H, W)))
        )
        for b in (bars(16, generator, angle=20.0), bars(16, generator, angle=40.0))
    ]
    assert 0 < gaps[0] < gaps[1]


def test_pose_path_points_rotate_toward_the_val_splits_turns():
    """Val people turned ±40° (half each way), training people upright, Rotate started at
    ±22.5°: the pose term's descent raises Rotate's weight and its angle, and leaves the
    photometric ops' magnitudes alone."""
    model, _, train, _, _ = setup(seed=9, dtype=torch.float32, batch=32)
    generator = torch.Generator().manual_seed(10)
    halves = bars(16, generator, angle=40.0), bars(16, generator, angle=-40.0)
    val = [torch.cat(parts) for parts in zip(*halves, strict=True)]
    policy = RelaxedPolicy(toy_space(), hard=True, seed=9)
    with torch.no_grad():
        policy.probability_logits.fill_(3.0)  # gates mostly open
    names = [n for n, _ in policy.named_parameters()]
    grads = dict(zip(names, make_search(model, policy).pose_path_gradient(train, val), strict=True))
    rotate, brightness = toy_space().index("Rotate"), toy_space().index("Brightness")
    assert grads["op_logits"][..., rotate].sum() < 0  # descent: Rotate gains weight
    assert grads["magnitude_logits"][..., rotate].sum() < 0  # and turns further (m toward 45°)
    assert (grads["magnitude_logits"][..., brightness] == 0).all()


@pytest.mark.parametrize("balance", [False, True])
def test_the_pose_term_adds_to_eq8_and_the_batchnorm_term_as_weighted(balance):
    """``pose_path = μ``: the hypergradient is Eq. 8 + λ·BatchNorm term + μ·pose term (each over
    its norm per policy tensor with ``balance_paths``), each term from a search computing it
    alone; μ = 0 changes nothing."""
    model, policy, train, val, noise = setup(seed=10, dtype=torch.float64, space=p2net_space(), warmup=5)
    eq8 = make_search(model, policy, torch.float64).hypergradient(train, val, noise)
    plain = make_search(model, policy, torch.float64)
    bn, pose = plain.batchnorm_path_gradient(train, val, noise), plain.pose_path_gradient(train, val, noise)
    options = {"batchnorm_path": 0.3, "balance_paths": balance}
    ours = make_search(model, policy, torch.float64, pose_path=0.7, **options).hypergradient(
        train, val, noise
    )
    off = make_search(model, policy, torch.float64, **options).hypergradient(train, val, noise)
    names = [name for name, _ in policy.named_parameters()]

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.norm() if balance and t.norm() > 0 else t

    for name, a, b, c, got, without in zip(names, eq8, bn, pose, ours, off, strict=True):
        torch.testing.assert_close(
            got, unit(a) + 0.3 * unit(b) + 0.7 * unit(c), rtol=1e-9, atol=1e-12, msg=name
        )
        torch.testing.assert_close(without, unit(a) + 0.3 * unit(b), rtol=1e-9, atol=1e-12, msg=name)
    assert (pose[3] != 0).any()  # the magnitudes of geometric ops (parameter 3) feel the pose term


@pytest.mark.parametrize("balance", [False, True])
def test_the_pose_term_between_policy_steps_is_averaged_into_the_next(balance):
    """With the val split's pose moments as the target, each batch augmented between policy steps
    adds its pose gradient; the policy step's pose term is the mean over those batches and its
    own (each as :meth:`pose_path_gradient` gives it), beside Eq. 8 and the BatchNorm term as
    before; the step uses them up. A batch augmented there is the policy's own forward on the
    same draws, detached."""
    from autopose.augment.policy import PolicyNoise
    from autopose.engine.search import feature_moments, pose_descriptors

    model, policy, train, val, noise = setup(seed=11, dtype=torch.float64, space=p2net_space(), warmup=5)
    generator = torch.Generator().manual_seed(12)
    between = [[t.to(torch.float64) for t in bars(8, generator, angle=angle)] for angle in (10.0, -25.0)]
    draws = []
    for _ in between:
        fresh = policy.sample_noise(8, generator)
        draws.append(PolicyNoise(fresh.sub_policy, fresh.bernoulli, fresh.cutout, fresh.sign, fresh.op))
    target = feature_moments(*pose_descriptors(val[1], val[2], (H, W)))
    eq8 = make_search(model, policy, torch.float64).hypergradient(train, val, noise)
    plain = make_search(model, policy, torch.float64)
    bn = plain.batchnorm_path_gradient(train, val, noise)
    options = {"batchnorm_path": 0.3, "balance_paths": balance, "pose_path": 0.7, "pose_target": target}
    search = make_search(model, policy, torch.float64, **options)
    pose_terms = [search.pose_path_gradient(b, val, d) for b, d in zip(between, draws, strict=True)]
    pose_terms.append(search.pose_path_gradient(train, val, noise))
    for batch, draw in zip(between, draws, strict=True):
        got = search.augment_between_policy_steps(batch, draw)
        with torch.no_grad():
            expected = policy(*batch, draw)
        for a, b in zip(got, expected, strict=True):
            assert not a.requires_grad
            torch.testing.assert_close(a, b)
    assert search.pose_batches == 2
    search.step(train, val, noise)
    assert (search.pose_batches, search.pose_gradient_sum) == (0, None)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.norm() if balance and t.norm() > 0 else t

    for index, (name, parameter) in enumerate(policy.named_parameters()):
        mean_pose = sum(terms[index] for terms in pose_terms) / len(pose_terms)
        expected = unit(eq8[index]) + 0.3 * unit(bn[index]) + 0.7 * unit(mean_pose)
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-9, atol=1e-12, msg=name)
    assert (pose_terms[0][3] != pose_terms[2][3]).any()  # the batches' terms differ


def test_the_pose_term_uses_the_target_moments_with_bessels_correction():
    """With ``pose_target``, the pose term compares the batch (Bessel-corrected spread) with the
    target's moments, not with the val batch: a val batch of other geometry changes nothing."""
    from autopose.engine.search import feature_moments, moments_gap, pose_descriptors

    model, policy, train, val, noise = setup(seed=13, dtype=torch.float64, space=p2net_space())
    target = feature_moments(*pose_descriptors(val[1], val[2], (H, W)))
    search = make_search(model, policy, torch.float64, pose_path=1.0, pose_target=target)
    generator = torch.Generator().manual_seed(14)
    other_val = [t.to(torch.float64) for t in bars(8, generator, angle=-10.0)]
    for a, b in zip(
        search.pose_path_gradient(train, val, noise),
        search.pose_path_gradient(train, other_val, noise),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    _, _, _, moved, visibility = search._augmented(train, noise)
    batch = pose_descriptors(moved, visibility, (H, W))
    features = batch[0][batch[1]]
    mean, spread = feature_moments(*batch, unbiased=True)
    torch.testing.assert_close(spread, features.std(dim=0))
    torch.testing.assert_close(mean, features.mean(dim=0))
    loss = search._pose_gap_to(search.augment(train, noise)[0], moved, visibility, other_val)
    torch.testing.assert_close(loss, moments_gap((mean, spread), target))
    assert float(loss.detach()) > 0


@pytest.mark.parametrize("balance", [False, True])
def test_a_photometric_batchnorm_term_leaves_the_ops_that_move_keypoints_to_the_others(balance):
    """``batchnorm_scope="photometric"``: the BatchNorm term's entries of the ops that move
    keypoints (Rotate, Scale, … in every ``K×N×O`` tensor) are 0, the rest as before (each
    term balanced after that); Eq. 8 and the pose term reach every op as before."""
    model, policy, train, val, noise = setup(seed=15, dtype=torch.float64, space=p2net_space(), warmup=5)
    eq8 = make_search(model, policy, torch.float64).hypergradient(train, val, noise)
    plain = make_search(model, policy, torch.float64)
    bn, pose = plain.batchnorm_path_gradient(train, val, noise), plain.pose_path_gradient(train, val, noise)
    moves = torch.tensor([spec.geometric or spec.mirrors for spec in policy.space.specs])
    assert moves.any() and not moves.all()
    assert any((b[..., moves] != 0).any() for b in bn if b.dim() == 3)  # the term does reach them
    options = {"batchnorm_path": 0.3, "pose_path": 0.7, "balance_paths": balance}
    ours = make_search(model, policy, torch.float64, batchnorm_scope="photometric", **options)
    got = ours.hypergradient(train, val, noise)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.norm() if balance and t.norm() > 0 else t

    for (name, _), a, b, c, g in zip(policy.named_parameters(), eq8, bn, pose, got, strict=True):
        kept = b if b.dim() != 3 else torch.where(moves, torch.zeros_like(b), b)
        torch.testing.assert_close(
            g, unit(a) + 0.3 * unit(kept) + 0.7 * unit(c), rtol=1e-9, atol=1e-12, msg=name
        )
    with pytest.raises(ValueError, match="batchnorm_scope"):
        make_search(model, policy, batchnorm_scope="images")


# -- the appearance moments ---------------------------------------------------------------------------
def appearance_by_hand(image: torch.Tensor) -> list[float]:
    """:func:`appearance_descriptors` of one ``3×H×W`` image, pixel by pixel in float64."""
    grey = image.double().mean(dim=0)
    height, width = grey.shape
    mean = float(grey.mean())
    contrast = math.sqrt(float(((grey - mean) ** 2).mean()))
    detail = 0.0
    for y in range(height):
        for x in range(width):
            window = grey[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]  # the 3×3 inside the image
            detail += abs(float(grey[y, x] - window.mean()))
    detail /= height * width
    eps = 1e-3
    return [math.log(mean + eps), math.log(contrast + eps), math.log(detail + eps) - math.log(contrast + eps)]


def test_appearance_descriptors_of_known_images():
    """Brightness, contrast and detail against a pixel-by-pixel count; a factor moves the first
    two by about its log and leaves detail; a blur lowers detail alone; a flat crop stays finite."""
    from autopose.engine.search import APPEARANCE_FEATURES, appearance_descriptors

    generator = torch.Generator().manual_seed(0)
    images, _, _ = bars(3, generator)
    got = appearance_descriptors(images)
    assert got.shape == (3, len(APPEARANCE_FEATURES))
    for image, row in zip(images, got, strict=True):
        expected = torch.tensor(appearance_by_hand(image), dtype=torch.float64)
        torch.testing.assert_close(row.double(), expected, rtol=0, atol=1e-5)
    darker = appearance_descriptors(ops.brightness_image(images, torch.tensor(0.5)))
    assert ((darker - got)[:, :2] < math.log(0.5) + 0.15).all() and ((darker - got)[:, :2] < 0).all()
    torch.testing.assert_close(darker[:, 2], got[:, 2], rtol=0, atol=0.1)
    blurred = appearance_descriptors(ops.sharpness_image(images, torch.tensor(0.0)))
    assert (blurred[:, 2] < got[:, 2] - 0.2).all()
    torch.testing.assert_close(blurred[:, 0], got[:, 0], rtol=0, atol=0.02)
    assert torch.isfinite(appearance_descriptors(torch.full((1, 3, 8, 6), 0.3))).all()


def test_the_appearance_moments_join_the_pose_gap_in_one_unit():
    """With ``appearance``: the pose term is the pose gap plus the appearance gap, each in units
    of the val side's spread: against the val batch (both sides' plain spreads) or, with the
    targets, against the split's moments (the batch's spreads with Bessel's correction). Without
    ``pose_path`` or with one target of two it is refused."""
    from autopose.engine.search import appearance_descriptors, feature_moments, moments_gap, pose_descriptors

    model, policy, train, val, noise = setup(seed=16, dtype=torch.float64, space=p2net_space())
    augmented, _, _, moved, visibility = make_search(model, policy, torch.float64)._augmented(train, noise)
    every = torch.ones(8, dtype=torch.bool)
    batch_pose = pose_descriptors(moved, visibility, (H, W))
    batch_look = appearance_descriptors(augmented)
    val_pose = pose_descriptors(val[1], val[2], (H, W))
    val_look = feature_moments(appearance_descriptors(val[0]), every)

    by_batch = make_search(model, policy, torch.float64, pose_path=1.0, appearance=True)
    expected = moments_gap(feature_moments(*batch_pose), feature_moments(*val_pose))
    expected = expected + moments_gap(feature_moments(batch_look, every), val_look)
    torch.testing.assert_close(by_batch._pose_gap_to(augmented, moved, visibility, val), expected)

    pose_target = feature_moments(*val_pose)
    by_split = make_search(
        model,
        policy,
        torch.float64,
        pose_path=1.0,
        appearance=True,
        pose_target=pose_target,
        appearance_target=val_look,
    )
    expected = moments_gap(feature_moments(*batch_pose, unbiased=True), pose_target)
    expected = expected + moments_gap(feature_moments(batch_look, every, unbiased=True), val_look)
    torch.testing.assert_close(by_split._pose_gap_to(augmented, moved, visibility, val), expected)
    with pytest.raises(ValueError, match="pose_path"):
        make_search(model, policy, appearance=True)
    with pytest.raises(ValueError, match="appearance_target"):
        make_search(model, policy, pose_path=1.0, appearance=True, pose_target=pose_target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_appearance_term_points_brightness_toward_the_val_splits_brightness(seed):
    """Brightness at factor 1.36 on every sample: with a val split half as bright, the pose
    term with ``appearance`` lowers the factor and the gate on descent; with the training crops
    the darker ones, it raises both. Without ``appearance`` it leaves Brightness alone."""
    policy = RelaxedPolicy(brightness_space(), init_magnitude=7.0, seed=seed)
    model = TinyPoseNet()
    generator = torch.Generator().manual_seed(seed + 10)
    noise = dataclasses.replace(policy.sample_noise(16, torch.Generator().manual_seed(seed + 20)), sign=None)
    normal, other = bars(16, generator), bars(16, generator)
    darker, dark_train = (0.5 * other[0], *other[1:]), (0.5 * normal[0], *normal[1:])
    names = [name for name, _ in policy.named_parameters()]
    magnitude, gate = names.index("magnitude_logits"), names.index("probability_logits")
    search = make_search(model, policy, pose_path=1.0, appearance=True)
    toward_dark = search.pose_path_gradient(normal, darker, noise)
    toward_bright = search.pose_path_gradient(dark_train, other, noise)
    assert toward_dark[magnitude].sum() > 0 > toward_bright[magnitude].sum()
    assert toward_dark[gate].sum() > 0 > toward_bright[gate].sum()
    blind = make_search(model, policy, pose_path=1.0).pose_path_gradient(normal, darker, noise)
    assert all((g == 0).all() for g in blind)

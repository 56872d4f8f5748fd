"""Behaviour of the class-conditional GAN: shapes, DiffAugment, conditioning, seeding, learning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipeline.gan.conditional import (
    DIFFAUGMENT,
    Discriminator,
    ExemplarGenerator,
    Generator,
    TrainedGan,
    _partners,
    diff_augment,
    generate,
    sample_grid,
    train_gan,
)
from pipeline.gan.projected import FeatureDiscriminator

CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class GanCfg:
    """The project's GAN params, shrunk to smoke-test size."""

    seed: int = 0
    steps: int = 6
    batch_size: int = 8
    z_dim: int = 16
    base_channels: int = 8
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    diffaugment: str = "color,translation,cutout"
    condition: str = "label"
    discriminator: str = "pixels"
    feature_backbone: str = "efficientnet_lite0"  # the feature discriminator's (packaged weights)
    feature_size: int = 32
    ada_target: float = 0.6
    ada_images: int = 200
    ada_interval: int = 2
    ema_decay: float = 0.999
    log_every: int = 2


def make_dataset(*, n_per_class: int = 4, num_classes: int = 2, size: int = 16, channels: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_per_class * num_classes, size, size, channels), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)
    return images, labels


def make_dark_bright_dataset(*, n_per_class: int = 20, size: int = 16, seed: int = 0):
    """Class 0: dark images, class 1: bright images, each with a little noise."""
    rng = np.random.default_rng(seed)
    dark = rng.normal(40, 10, (n_per_class, size, size, 1))
    bright = rng.normal(215, 10, (n_per_class, size, size, 1))
    images = np.clip(np.concatenate([dark, bright]), 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(2, dtype=np.int64), n_per_class)
    return images, labels


# ---------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("resolution", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_network_output_shapes_and_range(resolution, channels):
    torch.manual_seed(0)
    g = Generator(num_classes=3, channels=channels, resolution=resolution, z_dim=16, base_channels=8)
    d = Discriminator(num_classes=3, channels=channels, resolution=resolution, base_channels=8)
    z, y = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])

    images = g(z, y)
    logits = d(images, y)

    assert images.shape == (5, channels, resolution, resolution)
    assert torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert logits.shape == (5,)
    assert torch.isfinite(logits).all()


def exemplar_generator(images: np.ndarray, labels: np.ndarray, *, num_classes: int = 2, z_dim: int = 8):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ExemplarGenerator(num_classes=num_classes, channels=images.shape[3], resolution=images.shape[1],
                             z_dim=z_dim, base_channels=8, exemplars=x, exemplar_labels=torch.from_numpy(labels))


@pytest.mark.parametrize("resolution", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_exemplar_generator_and_its_pair_discriminator_have_the_right_shapes(resolution, channels):
    torch.manual_seed(0)
    images, labels = make_dataset(size=resolution, channels=channels)
    g = exemplar_generator(images, labels)
    d = Discriminator(num_classes=2, channels=channels, resolution=resolution, base_channels=8, pairs=True)
    z, y = torch.randn(5, 8), torch.tensor([0, 1, 1, 0, 1])

    fake = g(z, y)  # references picked from its own exemplars
    logits = d(torch.cat([g.references(y), fake], dim=1), y)

    assert fake.shape == (5, channels, resolution, resolution)
    assert torch.isfinite(fake).all() and fake.min() >= -1.0 and fake.max() <= 1.0
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_the_exemplar_generator_takes_its_classes_exemplars_in_turn_and_follows_its_reference():
    torch.manual_seed(0)
    images, labels = make_dataset(n_per_class=3, num_classes=3)
    g = exemplar_generator(images, labels, num_classes=4).eval()  # class 3 has no exemplar
    y = torch.tensor([1, 0, 1, 1, 1, 3])

    references = g.references(y)

    exemplars = g.exemplars
    for got, index in zip(references[:5], [3, 0, 4, 5, 3]):  # class 1's are images 3-5, in turn, then again
        assert torch.equal(got, exemplars[index])
    assert any(torch.equal(references[5], e) for e in exemplars)  # borrowed: the filter will reject it
    z = torch.randn(1, 8).repeat(2, 1)
    with torch.no_grad():  # same z and class, two references: two different images
        a, b = g(z, torch.tensor([0, 0]), exemplars[[0, 1]])
    assert not torch.allclose(a, b)


def test_partners_are_other_images_of_the_same_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0])  # class 1 has a single image
    index = torch.arange(7).repeat(20)

    partner = _partners(labels, index, torch.Generator().manual_seed(0))

    assert torch.equal(labels[partner], labels[index])
    alone = index == 3
    assert torch.equal(partner[alone], index[alone])  # its class's only image pairs with itself
    assert (partner[~alone] != index[~alone]).all()
    assert set(partner[index == 0].tolist()) == {2, 5}  # every other image of its class is drawn


def test_the_exemplar_gan_trains_reproducibly_and_keeps_the_data_as_its_exemplars():
    images, labels = make_dataset(channels=3)
    cfg = GanCfg(condition="image")

    first = train_gan(images, labels, 2, cfg, CPU).generator
    again = train_gan(images, labels, 2, cfg, CPU).generator
    fake, fake_labels = generate(first, per_class=5, z_dim=cfg.z_dim, seed=0, device=CPU)
    chunked, _ = generate(again, per_class=5, z_dim=cfg.z_dim, seed=0, device=CPU, batch_size=3)

    assert isinstance(first, ExemplarGenerator) and not first.training
    assert torch.equal(first.exemplars, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert fake.shape == (10, 16, 16, 3) and fake_labels.tolist() == [0] * 5 + [1] * 5
    assert np.array_equal(fake, chunked)  # same run, and the references do not depend on the batch size


def test_the_exemplar_gan_learns_class_conditional_brightness():
    """As for the label GAN; here every reference already has its class's brightness, so what is tested is that
    the generator keeps it rather than washing it out."""
    images, labels = make_dark_bright_dataset()
    cfg = GanCfg(condition="image", steps=100, batch_size=16, base_channels=16, log_every=50)

    generator = train_gan(images, labels, 2, cfg, CPU).generator
    fake, fake_labels = generate(generator, per_class=32, z_dim=cfg.z_dim, seed=0, device=CPU)

    assert fake[fake_labels == 0].mean() < 110 and fake[fake_labels == 1].mean() > 145


def test_spectral_norm_is_on_every_discriminator_layer():
    d = Discriminator(num_classes=4, channels=3, resolution=32, base_channels=8)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]

    assert len(layers) >= 5  # 3 down convs, the output linear and the projection embedding
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight"), layer


def test_spectral_norm_bounds_the_layer_weight():
    torch.manual_seed(0)
    d = Discriminator(num_classes=4, channels=1, resolution=16, base_channels=8)
    linear = d.linear
    with torch.no_grad():
        linear.parametrizations.weight.original.mul_(100.0)  # make the raw weight huge
    d.train()
    for _ in range(20):  # let the power iteration converge
        d(torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))

    assert torch.linalg.matrix_norm(linear.weight, ord=2).item() == pytest.approx(1.0, abs=0.05)


def test_generator_is_class_conditional():
    torch.manual_seed(0)
    g = Generator(num_classes=3, channels=1, resolution=16, z_dim=16, base_channels=8).eval()
    z = torch.randn(1, 16).repeat(3, 1)

    with torch.no_grad():
        images = g(z, torch.tensor([0, 1, 2]))

    assert not torch.allclose(images[0], images[1])
    assert not torch.allclose(images[1], images[2])


def test_discriminator_uses_the_class_through_projection():
    torch.manual_seed(0)
    d = Discriminator(num_classes=3, channels=1, resolution=16, base_channels=8).eval()
    x = torch.randn(1, 1, 16, 16).repeat(3, 1, 1, 1)

    with torch.no_grad():
        logits = d(x, torch.tensor([0, 1, 2]))

    assert len(set(logits.tolist())) == 3


def test_networks_reject_unsupported_resolution():
    with pytest.raises(ValueError, match="power of two"):
        Generator(num_classes=2, channels=1, resolution=24, z_dim=8, base_channels=8)
    with pytest.raises(ValueError, match="channels"):
        Discriminator(num_classes=2, channels=2, resolution=16, base_channels=8)


def test_the_feature_discriminator_trains_its_heads_only_and_passes_gradients_to_the_images():
    """Projected GAN's discriminator: the packaged Lite0 stays frozen in eval mode (weights and batch-norm
    statistics), through a discriminator step and the generator step's requires_grad_ toggling; the heads learn;
    the class enters by projection; the generator's gradient reaches the pixels."""
    torch.manual_seed(0)
    d = FeatureDiscriminator(num_classes=3, base_channels=8, feature_size=32).train()
    frozen = {k: v.clone() for k, v in d.features.state_dict().items()}
    heads = {k: v.clone() for k, v in d.heads.state_dict().items()}
    assert not d.features.training and d.heads.training
    x, y = torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-2)
    logits = d(x, y)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    F.relu(1 - logits).mean().backward()
    optimizer.step()
    d.requires_grad_(False)  # the generator step
    fake = x.clone().requires_grad_(True)
    d(fake, y).mean().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    d.requires_grad_(True)
    assert not any(p.requires_grad for p in d.features.parameters())
    assert not any(p.requires_grad for p in [*d.channel_mix.parameters(), *d.scale_mix.parameters()])
    assert all(torch.equal(v, d.features.state_dict()[k]) for k, v in frozen.items())  # BN statistics included
    assert any(not torch.equal(v, d.heads.state_dict()[k]) for k, v in heads.items())
    with torch.no_grad():
        same = d(x[:1].repeat(3, 1, 1, 1), torch.tensor([0, 1, 2]))
    assert len(set(same.tolist())) == 3


def test_train_gan_with_the_feature_discriminator_gives_the_same_run_twice():
    images, labels = make_dataset(channels=3)
    cfg = GanCfg(discriminator="features", steps=4)
    first = train_gan(images, labels, 2, cfg, CPU)
    again = train_gan(images, labels, 2, cfg, CPU)
    assert [h["loss_d"] for h in first.history] == [h["loss_d"] for h in again.history]
    samples = [generate(t.generator, per_class=2, z_dim=cfg.z_dim, seed=1, device=CPU)[0] for t in (first, again)]
    assert np.array_equal(*samples)


# ------------------------------------------------------------------------------------- DiffAugment


@pytest.mark.parametrize("name", sorted(DIFFAUGMENT))
def test_diffaugment_function_keeps_shape_dtype_device_and_changes_the_batch(name):
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 2 - 1

    out = DIFFAUGMENT[name](x)

    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert out.device == x.device
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("name", sorted(DIFFAUGMENT))
def test_diffaugment_function_keeps_float64_and_passes_gradients(name):
    torch.manual_seed(0)
    x = (torch.rand(4, 1, 16, 16, dtype=torch.float64) * 2 - 1).requires_grad_(True)

    out = DIFFAUGMENT[name](x)
    out.sum().backward()

    assert out.dtype == torch.float64
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_translation_moves_content_without_changing_it():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0  # a centred square that no shift pushes off the image

    out = DIFFAUGMENT["translation"](x)

    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    assert not all(torch.equal(a, b) for a, b in zip(out, x))


def test_cutout_zeros_a_quarter_of_the_image_or_less():
    torch.manual_seed(0)
    x = torch.ones(16, 1, 32, 32)

    zeroed = (DIFFAUGMENT["cutout"](x) == 0).float().mean(dim=(1, 2, 3))

    assert (zeroed > 0).all()
    assert (zeroed <= 0.25 + 1e-6).all()


def test_diff_augment_empty_policy_is_identity():
    x = torch.rand(2, 1, 16, 16)

    assert torch.equal(diff_augment(x, ""), x)


def test_diff_augment_unknown_policy_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'flip'.*color, translation, cutout"):
        diff_augment(torch.rand(2, 1, 16, 16), "color,flip")


# ------------------------------------------------------------------------------------------ training


def test_train_gan_returns_ema_generator_on_cpu_in_eval_mode_and_history():
    images, labels = make_dataset(channels=3)

    trained = train_gan(images, labels, 2, GanCfg(), CPU)

    assert isinstance(trained, TrainedGan)
    assert isinstance(trained.generator, Generator)
    assert not trained.generator.training
    assert all(p.device.type == "cpu" for p in trained.generator.parameters())
    assert [h["step"] for h in trained.history] == [2, 4, 6]
    for entry in trained.history:
        assert set(entry) == {"step", "loss_d", "loss_g", "d_real", "d_fake", "p", "r"}
        assert 0 <= entry["p"] <= 1 and (entry["r"] is None or -1 <= entry["r"] <= 1)  # r: at p's adjustments
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in entry.values() if v is not None)


def test_train_gan_updates_the_ema_generator():
    images, labels = make_dataset()
    cfg = GanCfg(steps=3)
    torch.manual_seed(cfg.seed)  # train_gan builds its networks right after seeding like this
    untrained = Generator(
        num_classes=2, channels=1, resolution=16, z_dim=cfg.z_dim, base_channels=cfg.base_channels
    )

    trained = train_gan(images, labels, 2, cfg, CPU).generator

    assert not torch.equal(trained.project.weight, untrained.project.weight)


def test_same_seed_gives_identical_samples_and_different_seed_differs():
    images, labels = make_dataset()
    cfg = GanCfg()

    def samples(train_seed: int) -> np.ndarray:
        generator = train_gan(images, labels, 2, dataclasses.replace(cfg, seed=train_seed), CPU).generator
        return generate(generator, per_class=3, z_dim=cfg.z_dim, seed=7, device=CPU)[0]

    first, again, other = samples(0), samples(0), samples(1)

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_gan_learns_class_conditional_brightness():
    images, labels = make_dark_bright_dataset()
    cfg = GanCfg(steps=200, batch_size=16, base_channels=16, log_every=50)

    generator = train_gan(images, labels, 2, cfg, CPU).generator
    fake, fake_labels = generate(generator, per_class=32, z_dim=cfg.z_dim, seed=0, device=CPU)

    dark_mean = fake[fake_labels == 0].mean()
    bright_mean = fake[fake_labels == 1].mean()
    # The data's class means are 40 and 215. Trained normally the gap is ~120-135 over seeds; with G
    # or D blind to y (y replaced by zeros) it stayed under 40, both classes near the same grey.
    assert bright_mean - dark_mean > 80, (dark_mean, bright_mean)
    assert dark_mean < 110 and bright_mean > 145, (dark_mean, bright_mean)


@pytest.mark.gpu
@pytest.mark.parametrize("condition", ["label", "image"])
def test_train_and_generate_on_cuda_with_bf16_autocast(condition):
    images, labels = make_dataset(channels=3, size=32)
    cuda = torch.device("cuda")

    trained = train_gan(images, labels, 2, GanCfg(condition=condition), cuda)
    fake, fake_labels = generate(trained.generator, per_class=3, z_dim=GanCfg().z_dim, seed=0, device=cuda)

    assert all(np.isfinite(v) for entry in trained.history for v in entry.values())
    assert fake.shape == (6, 32, 32, 3) and fake.dtype == np.uint8
    assert fake_labels.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("images", "labels", "num_classes", "message"),
    [
        (np.zeros((4, 16, 16, 1), np.float32), np.zeros(4, np.int64), 2, "uint8 NHWC"),
        (np.zeros((4, 16, 16), np.uint8), np.zeros(4, np.int64), 2, "uint8 NHWC"),
        (np.zeros((4, 16, 16, 2), np.uint8), np.zeros(4, np.int64), 2, "channels"),
        (np.zeros((0, 16, 16, 1), np.uint8), np.zeros(0, np.int64), 2, "empty"),
        (np.zeros((4, 16, 32, 1), np.uint8), np.zeros(4, np.int64), 2, "square"),
        (np.zeros((4, 24, 24, 1), np.uint8), np.zeros(4, np.int64), 2, "power of two in 16..128"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), 2, "power of two in 16..128"),
        (np.zeros((4, 256, 256, 1), np.uint8), np.zeros(4, np.int64), 2, "power of two in 16..128"),
        (np.zeros((4, 16, 16, 1), np.uint8), np.zeros(3, np.int64), 2, r"labels must have shape \(4,\)"),
        (np.zeros((4, 16, 16, 1), np.uint8), np.array([0, 1, 2, 0]), 2, r"label 2 is outside 0\.\.1"),
        (np.zeros((4, 16, 16, 1), np.uint8), np.array([0, -1, 1, 0]), 2, r"label -1 is outside 0\.\.1"),
        (np.zeros((4, 16, 16, 1), np.uint8), np.zeros(4, np.float32), 2, "integers"),
    ],
)
def test_train_gan_rejects_bad_input(images, labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        train_gan(images, labels, num_classes, GanCfg(), CPU)


def test_train_gan_rejects_unknown_diffaugment_policy():
    images, labels = make_dataset()

    with pytest.raises(ValueError, match="'zoom'"):
        train_gan(images, labels, 2, GanCfg(diffaugment="zoom"), CPU)


# -------------------------------------------------------------------------------------------- sampling


def test_generate_returns_per_class_samples_in_class_major_order():
    torch.manual_seed(0)
    g = Generator(num_classes=3, channels=3, resolution=16, z_dim=8, base_channels=8).eval()

    images, labels = generate(g, per_class=4, z_dim=8, seed=0, device=CPU)

    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_generate_is_deterministic_and_independent_of_batch_size():
    torch.manual_seed(0)
    g = Generator(num_classes=2, channels=1, resolution=16, z_dim=8, base_channels=8).eval()

    whole, _ = generate(g, per_class=5, z_dim=8, seed=3, device=CPU)
    chunked, _ = generate(g, per_class=5, z_dim=8, seed=3, device=CPU, batch_size=3)
    other, _ = generate(g, per_class=5, z_dim=8, seed=4, device=CPU)

    assert np.array_equal(whole, chunked)
    assert not np.array_equal(whole, other)


def test_generate_rejects_mismatched_z_dim():
    g = Generator(num_classes=2, channels=1, resolution=16, z_dim=8, base_channels=8)

    with pytest.raises(ValueError, match="z_dim 16"):
        generate(g, per_class=1, z_dim=16, seed=0, device=CPU)


def test_sample_grid_shape_and_row_placement():
    size, pad = 16, 2
    labels = np.array([2, 0, 0, 1, 0, 0], dtype=np.int64)
    images = np.stack([np.full((size, size, 3), 10 * (i + 1), np.uint8) for i in range(len(labels))])

    grid = sample_grid(images, labels, num_classes=3, per_class=3)

    assert grid.shape == (3 * size + 4 * pad, 3 * size + 4 * pad, 3)
    assert grid.dtype == np.uint8
    cell = lambda row, col: grid[pad + row * (size + pad), pad + col * (size + pad), 0]  # noqa: E731
    assert [cell(0, c) for c in range(3)] == [20, 30, 50]  # class 0: first three of its images, in order
    assert cell(1, 0) == 40 and cell(2, 0) == 10  # classes 1 and 2 each on their own row
    assert grid[0, 0, 0] == 255 and cell(1, 1) == 255  # white padding, and a short row's empty cells white too

"""The augmentation layer and the augment stage: policies from params, saved, reloaded, previewed."""

import numpy as np
from PIL import Image

from pipeline.augmentation.policy import augment_image, augment_seeded, build_policy, load_policy, reseed
from pipeline.data.collected import load_collected
from pipeline.stages import augment

from conftest import make_params


def test_policy_is_saved_previewed_and_reloads_identically(tmp_path, collected_dir):
    params = make_params(augment__preview_images=12)
    augment.run(params.augment, collected_dir, tmp_path / "aug")
    reloaded = load_policy(tmp_path / "aug" / "policy.json")
    built = build_policy(params.augment.transforms, seed=3)
    assert [type(t).__name__ for t in reloaded.transforms] == [type(t).__name__ for t in built.transforms] == [
        "Affine", "ElasticTransform", "RandomBrightnessContrast", "CoarseDropout"]
    image = load_collected(collected_dir).images[0]
    reloaded.set_random_seed(7)
    built.set_random_seed(7)
    assert np.array_equal(augment_image(reloaded, image), augment_image(built, image))
    preview = Image.open(tmp_path / "aug" / "preview.png")
    # 12 images -> 2 rows of 8 originals + 2 rows of augmented, 16 px tiles enlarged 6x with 2 px padding
    assert preview.size == ((8 * 18 + 2) * 6, (4 * 18 + 2) * 6)


def test_augmentation_changes_images_but_keeps_shape_and_dtype(collected_dir):
    params = make_params(**{"augment__transforms": {"affine": {"p": 1, "rotate": 30, "scale": [0.8, 0.9],
                                                               "translate": 0.1, "shear": 10}}})
    policy = build_policy(params.augment.transforms, seed=0)
    images = load_collected(collected_dir).images[:8]
    out = np.stack([augment_image(policy, im) for im in images])
    assert out.shape == images.shape and out.dtype == np.uint8
    assert (out != images).any(axis=(1, 2, 3)).all()  # p=1: every image changed


def test_same_seed_same_augmentation_other_seed_differs(collected_dir):
    params = make_params()
    image = load_collected(collected_dir).images[3]
    draws = [[augment_image(build_policy(params.augment.transforms, seed), image) for _ in range(4)]
             for seed in (0, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(draws[0], draws[2]))


def test_a_reseeded_policy_repeats_itself_and_tosses_each_transforms_coin_independently(collected_dir):
    policy = build_policy(make_params().augment.transforms, seed=0)  # p 0.9, 0.3, 0.5, 0.2
    image = load_collected(collected_dir).images[3]
    assert np.array_equal(augment_seeded(policy, image, 11), augment_seeded(policy, image, 11))
    coins = []
    for seed in range(4000):
        reseed(policy, seed)
        coins.append([t.should_apply() for t in policy.transforms])
    coins = np.array(coins)
    assert np.allclose(coins.mean(0), [0.9, 0.3, 0.5, 0.2], atol=0.03)
    # independent coins: each pair's joint rate is the product of theirs (seeded per transform, albumentations'
    # own way, elastic never came without affine, nor dropout without the other three)
    for a in range(4):
        for b in range(a + 1, 4):
            for want_a in (True, False):
                joint = ((coins[:, a] == want_a) & coins[:, b]).mean()
                expected = (coins[:, a] == want_a).mean() * coins[:, b].mean()
                assert abs(joint - expected) < 0.025, (a, b, want_a, joint, expected)

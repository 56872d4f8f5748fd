"""The fine-tuning engine on real digits: batch plans, mixup/cutmix, checkpoints with exact resume, workers,
early stopping and EMA."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.augmentation.policy import augment_seeded, build_policy
from pipeline.data.collected import load_collected
from pipeline.runtime.checkpoint import Checkpointing
from pipeline.runtime.compute import World, channels_last
from pipeline.runtime.errors import PipelineError
from pipeline.training import loop as training
from pipeline.training.backbones import Classifier, create_backbone
from pipeline.training.loop import BatchPlan, FitSetup, MixupCutmix, SyntheticLoss, TrainingSet, fit, lr_lambda, predict
from pipeline.training.semi import FixMatch, PoolBatches

from conftest import make_params

CPU = torch.device("cpu")


def flat(plan_epoch):
    return [pair for step in plan_epoch for pair in step]


def test_every_real_image_comes_up_each_epoch_and_gan_samples_fill_their_share():
    plan = BatchPlan(real=64, synthetic=10, batch=16, synthetic_share=0.25, seed=3, world=World())
    epoch = plan.epoch(0)
    assert plan.steps_per_epoch == 4 and len(epoch) == 4 and all(len(step) == 16 for step in epoch)
    real = [i for i, _ in flat(epoch) if i < 64]
    assert len(real) == len(set(real)) == 48  # 12 real per batch, no real image twice within an epoch
    assert all(sum(i >= 64 for i, _ in step) == 4 for step in epoch)  # 25% of 16
    seeds = [s for _, s in flat(epoch)] + [s for _, s in flat(plan.epoch(1))]
    assert len(set(seeds)) == len(seeds)  # every augmentation draw has its own seed
    assert plan.epoch(1) == plan.epoch(1) and plan.epoch(1) != plan.epoch(2)
    no_gan = BatchPlan(real=64, synthetic=0, batch=16, synthetic_share=0.25, seed=3, world=World())
    assert sorted(i for i, _ in flat(no_gan.epoch(0))) == list(range(64))
    assert no_gan.steps_per_epoch == plan.steps_per_epoch  # the same steps with and without GAN samples


def test_under_torchrun_the_processes_split_the_one_process_batch():
    whole = BatchPlan(real=40, synthetic=8, batch=16, synthetic_share=0.5, seed=0, world=World())
    parts = [BatchPlan(real=40, synthetic=8, batch=16, synthetic_share=0.5, seed=0, world=World(rank, 2))
             for rank in range(2)]
    for step, (a, b) in enumerate(zip(parts[0].epoch(5), parts[1].epoch(5))):
        assert a + b == whole.epoch(5)[step]
    with pytest.raises(PipelineError, match=r"batch_size \(15\) must divide evenly over the 2 processes"):
        BatchPlan(real=40, synthetic=0, batch=15, synthetic_share=0, seed=0, world=World(0, 2))


def test_mixup_and_cutmix_give_soft_targets_that_match_the_pixels():
    x = torch.zeros(8, 1, 10, 10)
    x[4:] = 1  # images 0-3 black, 4-7 white
    targets = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2).float()
    for mixup, cutmix in ((0.4, 0), (0, 1.0)):
        mixed, soft = MixupCutmix(mixup, cutmix, seed=1)(x, targets)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        # the white share of each picture is exactly the probability its target gives class 1
        assert torch.allclose(mixed.mean((1, 2, 3)), soft[:, 1], atol=1e-6)
    a, b = MixupCutmix(0.4, 1.0, seed=7), MixupCutmix(0.4, 1.0, seed=7)
    for _ in range(3):
        assert torch.equal(a(x, targets)[0], b(x, targets)[0])
    assert not MixupCutmix(0, 0, seed=0).enabled


def test_gan_samples_weigh_less_and_carry_the_filters_confidence_when_asked():
    images = np.zeros((6, 8, 8, 1), np.uint8)
    data = TrainingSet(images[:4], np.array([0, 1, 2, 0]), images[4:], np.array([1, 2]), images[:0],
                       np.array([], np.int64), synthetic_confidence=np.array([0.9, 0.6], np.float32))
    ids, y = torch.tensor([0, 4, 1, 5]), torch.tensor([0, 1, 1, 2])
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none")

    weighted = SyntheticLoss(data, make_params(finetune__synthetic_weight=0.25).finetune, 3, CPU)
    assert weighted.active
    hard = weighted.targets(y, ids)
    assert torch.equal(hard, torch.nn.functional.one_hot(y, 3).float())  # not soft unless asked
    expected = (per_image * torch.tensor([1, 0.25, 1, 0.25])).mean()
    assert torch.allclose(weighted(logits, hard, ids, 0.0), expected)

    soft = SyntheticLoss(data, make_params(finetune__synthetic_soft=True).finetune, 3, CPU)
    targets = soft.targets(y, ids)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert torch.allclose(targets[1], torch.tensor([0.05, 0.9, 0.05]))  # GAN sample 0: class 1 at 0.9
    assert torch.allclose(targets[3], torch.tensor([0.2, 0.2, 0.6]))
    assert torch.equal(targets[[0, 2]], hard[[0, 2]])  # real images stay one-hot

    assert not SyntheticLoss(data, make_params().finetune, 3, CPU).active  # the defaults train as before
    no_scores = TrainingSet(*[getattr(data, f) for f in ("images", "targets", "synthetic", "synthetic_targets",
                                                          "inner", "inner_targets")])
    with pytest.raises(PipelineError, match="synthetic_soft needs the GAN samples' filter confidences"):
        SyntheticLoss(no_scores, make_params(finetune__synthetic_soft=True).finetune, 3, CPU)


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = lr_lambda(total_steps=100, warmup_steps=10)
    values = [factor(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert factor(100) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def digits(collected_dir):
    data = load_collected(collected_dir)
    images, targets = data.select(data.labelled)
    external, external_targets = data.select(data.external)
    return images, targets.astype(np.int64), external[:200], external_targets[:200]


def training_set(images, targets, inner=0):
    empty = images[:0]
    return TrainingSet(images[inner:], targets[inner:], empty, targets[:0], images[:inner], targets[:inner])


def small_cnn():
    torch.manual_seed(0)
    return Classifier(create_backbone("compact_cnn", "none"), num_classes=10, input_size=16)


def test_batches_and_models_are_channels_last_on_the_cpu_and_predict_as_the_default_layout_does(digits):
    """The CPU computes in channels-last layout too (about 2x as fast here): same values, other strides."""
    _, _, external, _ = digits
    raw = torch.from_numpy(np.repeat(external[:16], 3, axis=3))  # RGB: with one channel both layouts coincide
    x = training.to_batch(raw, CPU)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert torch.equal(x, raw.permute(0, 3, 1, 2).float() / 255)
    model = small_cnn().eval()
    with torch.no_grad():
        default = model(x.contiguous())
        laid_out = channels_last(model)(x)
    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(laid_out, default, rtol=1e-4, atol=1e-5)
    probs = predict(model, raw.numpy(), CPU, 10)
    torch.testing.assert_close(torch.from_numpy(probs), default.softmax(1), rtol=1e-4, atol=1e-5)


def setup_for(epochs=4, policy=True, checkpoint=None, **overrides):
    params = make_params(**{f"finetune__{k}": v for k, v in overrides.items()}).finetune
    built = build_policy(make_params().augment.transforms, 0) if policy else None
    return FitSetup(params, epochs, False, built, CPU, World(), checkpoint)


def test_workers_do_not_change_the_result(digits):
    """Augmentation is seeded per image, so 2 DataLoader worker processes train the very same model as none."""
    images, targets, external, _ = digits
    probs = []
    for workers in (0, 2):
        result = fit(small_cnn(), training_set(images, targets), setup_for(epochs=2, workers=workers))
        probs.append(predict(result.model, external, CPU, 10))
    assert np.array_equal(probs[0], probs[1])


def killed_in_epoch_4(monkeypatch, train) -> None:
    """Run `train()` until it is killed during its fourth epoch."""
    real_epoch, calls = training._train_epoch, []

    def dies_in_epoch_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_train_epoch", dies_in_epoch_4)
        with pytest.raises(KeyboardInterrupt):
            train()


def test_a_killed_run_resumes_exactly_where_its_checkpoint_left_off(digits, tmp_path, monkeypatch):
    images, targets, external, _ = digits
    straight = fit(small_cnn(), training_set(images, targets), setup_for(epochs=5, mixup=0.2, ema_decay=0.9))
    checkpoint = Checkpointing(tmp_path, every=2, fingerprint="data+settings")
    # killed during epoch 4, with the epoch-2 checkpoint on disk
    killed_in_epoch_4(monkeypatch, lambda: fit(small_cnn(), training_set(images, targets),
                                               setup_for(epochs=5, mixup=0.2, ema_decay=0.9, checkpoint=checkpoint)))
    saved = tmp_path / training.CHECKPOINT_FILE
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:  # plain tensors and JSON, nothing pickled
        assert handle.metadata()["fingerprint"] == "data+settings" and "ema/n_averaged" in handle.keys()
    torch.manual_seed(1234)  # whatever the global stream holds now, the checkpoint's is restored
    resumed = fit(small_cnn(), training_set(images, targets),
                  setup_for(epochs=5, mixup=0.2, ema_decay=0.9, checkpoint=checkpoint))
    assert resumed.resumed_from == 4 - 2 and resumed.history == straight.history
    assert np.array_equal(predict(resumed.model, external, CPU, 10), predict(straight.model, external, CPU, 10))
    assert not saved.exists()  # removed once training ended
    other = Checkpointing(tmp_path, every=2, fingerprint="other data")
    with monkeypatch.context() as patch:
        patch.setattr(training, "recalibrate_batch_norm", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            fit(small_cnn(), training_set(images, targets), setup_for(epochs=5, checkpoint=checkpoint))
    assert saved.exists()
    assert fit(small_cnn(), training_set(images, targets), setup_for(epochs=5, checkpoint=other)).resumed_from == 0


def test_early_stopping_keeps_the_best_inner_epoch(digits):
    """A learning rate far too high makes the inner loss worsen after its best epoch; training stops `patience`
    epochs later and the kept weights are those of the best epoch."""
    images, targets, _, _ = digits
    data = training_set(images, targets, inner=10)
    result = fit(small_cnn(), data, setup_for(epochs=40, policy=False, patience=3, lr_head=0.5, warmup_epochs=0))
    losses = [h["inner_loss"] for h in result.history]
    assert result.stopped_early and len(result.history) == result.best_epoch + 3 < 40
    assert losses[result.best_epoch - 1] == min(losses)
    kept_loss, _ = training.inner_scores(result.model, data, CPU)
    assert kept_loss == pytest.approx(min(losses), rel=1e-5)


def test_ema_weights_are_what_is_kept(digits):
    images, targets, external, _ = digits
    plain = fit(small_cnn(), training_set(images, targets), setup_for(epochs=3))
    averaged = fit(small_cnn(), training_set(images, targets), setup_for(epochs=3, ema_decay=0.9))
    a, b = predict(plain.model, external, CPU, 10), predict(averaged.model, external, CPU, 10)
    assert np.isfinite(b).all() and not np.allclose(a, b, atol=1e-3)
    assert plain.history == averaged.history  # the average follows training; it does not change it


@pytest.mark.gpu
def test_cuda_training_with_compile_workers_and_pinned_memory_matches_its_own_rerun(digits):
    """On a GPU: bf16 autocast, channels-last, pinned memory, 2 workers and torch.compile train a model that learns
    (chance is 0.1 on 200 unseen digits) and predicts finite probabilities."""
    images, targets, external, external_targets = digits
    cuda = torch.device("cuda")
    params = make_params(finetune__compile=True, finetune__workers=2, finetune__device="cuda").finetune
    policy = build_policy(make_params().augment.transforms, 0)
    model = small_cnn().to(cuda).to(memory_format=torch.channels_last)
    result = fit(model, training_set(images, targets), FitSetup(params, 30, False, policy, cuda, World()))
    probs = predict(result.model, external, cuda, 10)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-3)
    assert (probs.argmax(1) == external_targets).mean() > 0.6  # the same run on the CPU (no compile): 0.915
    assert next(result.model.parameters()).device.type == "cuda"


def test_pool_views_are_seeded_by_step_and_the_weak_one_is_a_shift_of_the_image(digits):
    images = digits[2][:40]
    batches = PoolBatches(images, build_policy(make_params().augment.transforms, 0), 8, seed=3, world=World())
    weak, strong = batches.views(epoch=2, step=5)
    again = batches.views(epoch=2, step=5)
    assert torch.equal(weak, again[0]) and torch.equal(strong, again[1])
    assert not torch.equal(weak, batches.views(epoch=2, step=6)[0])
    assert weak.shape == strong.shape == (8, 16, 16, 1) and weak.dtype == torch.uint8
    other_rank = PoolBatches(images, None, 8, seed=3, world=World(1, 2))
    assert not np.array_equal(other_rank.indices(2, 5), batches.indices(2, 5))  # each process its own images
    for picked, view in zip(images[batches.indices(2, 5)], weak.numpy()):
        padded = np.pad(picked, ((2, 2), (2, 2), (0, 0)), mode="reflect")  # at most 16 / 8 = 2 px each way
        assert any(np.array_equal(view, padded[2 + dy:18 + dy, 2 + dx:18 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    assert (weak.numpy() != strong.numpy()).any(axis=(1, 2, 3)).all()  # augmented and cut out


def test_views_made_ahead_on_a_thread_are_the_views_made_in_line(digits):
    """On a GPU, FixMatch makes the next step's pool views on a thread while this step trains and the labelled
    batch is augmented with the same policy: what comes back is what the step's views are, and nothing is made
    past the last step."""
    images = digits[2][:40]
    policy = build_policy(make_params().augment.transforms, 0)
    params = make_params(finetune__unlabelled_ratio=1, finetune__batch_size=8).finetune
    semi = FixMatch(params, images, policy, steps_per_epoch=4, epochs=3, world=World(), ahead=True)
    in_line = PoolBatches(images, build_policy(make_params().augment.transforms, 0), 8, params.seed, World())
    for epoch, step in [(e, s) for e in range(3) for s in range(4)]:
        weak, strong = semi.views(epoch, step)
        for i, image in enumerate(images):  # the labelled batch, on the main thread, with the same policy object
            augment_seeded(policy, image, 1000 * step + i)
        expected = in_line.views(epoch, step)
        assert torch.equal(weak, expected[0]) and torch.equal(strong, expected[1])
    assert semi._next is None  # (2, 3) was the last step
    semi.close()


def test_only_pseudo_labels_the_teacher_is_sure_of_teach_the_student():
    params = make_params(finetune__pseudo_threshold=0.8, finetune__unlabelled_weight=2.0,
                         finetune__unlabelled_start=0.5).finetune
    semi = FixMatch(params, np.zeros((4, 8, 8, 1), np.uint8), None, steps_per_epoch=10, epochs=10, world=World())
    assert not semi.active(49) and semi.active(50)
    teacher = torch.tensor([[6.0, 0.0, 0.0], [0.5, 0.0, 0.0]])  # sure of class 0 (0.995), then unsure (0.45)
    student = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    loss, passed = semi.loss(student, teacher)
    sure = torch.nn.functional.cross_entropy(student[:1], torch.tensor([0]))
    assert passed.item() == 0.5 and torch.allclose(loss, 2.0 * sure / 2)


def test_with_a_pool_the_teacher_is_kept_and_a_killed_run_resumes_exactly(digits, tmp_path, monkeypatch):
    images, targets, external, _ = digits
    data = dataclasses.replace(training_set(images, targets), unlabelled=external[:120])
    pooled = dict(unlabelled_start=0.5, pseudo_threshold=0.3, unlabelled_ratio=1)
    straight = fit(small_cnn(), data, setup_for(epochs=4, **pooled))
    rates = [h.get("pool_pass_rate") for h in straight.history]
    assert rates[:2] == [None, None] and all(r is not None and 0 <= r <= 1 for r in rates[2:])
    lrs = [h["lr_head"] for h in straight.history]
    assert lrs[0] > lrs[1] < lrs[2]  # the labels' own schedule ends; the rate warms up again with the pool
    plain = fit(small_cnn(), training_set(images, targets), setup_for(epochs=4, **pooled))
    assert not np.allclose(predict(plain.model, external, CPU, 10), predict(straight.model, external, CPU, 10))
    checkpoint = Checkpointing(tmp_path, every=2, fingerprint="pool")
    killed_in_epoch_4(monkeypatch, lambda: fit(small_cnn(), data, setup_for(epochs=4, checkpoint=checkpoint, **pooled)))
    resumed = fit(small_cnn(), data, setup_for(epochs=4, checkpoint=checkpoint, **pooled))
    assert resumed.resumed_from == 2 and resumed.history == straight.history
    assert np.array_equal(predict(resumed.model, external, CPU, 10), predict(straight.model, external, CPU, 10))

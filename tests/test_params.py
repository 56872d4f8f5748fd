"""params.yaml is validated before any work: unknown keys, wrong types and impossible values name the key."""

import pytest

from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import load_params, parse_params

from conftest import make_params, raw_params, with_overrides


def test_default_params_yaml_is_valid():
    params = load_params("params.yaml")
    assert params.collect.folds == (0, 1, 2, 3, 4)
    assert params.collect.images_per_class == 10
    assert params.variants["probe"].backbone == "efficientnet_lite0" and params.variants["cnn_pool"].unlabelled
    assert set(params.variants) == {"probe", "cnn", "cnn_synthetic", "cnn_pool"}
    assert params.variants["probe"].strategy == "linear_probe" and params.variants["cnn_synthetic"].synthetic
    assert params.scarcity.variants == ("probe",)
    assert [t.name for t in params.augment.transforms][0] == "affine"


def test_the_study_preset_adds_the_recipes_the_default_leaves_out_and_changes_nothing_else():
    default, study = raw_params(), raw_params("study")
    params = parse_params(study)
    assert set(params.variants) == {"scratch", "baseline", "augment", "synthetic", "probe", "cnn", "cnn_synthetic",
                                    "cnn_pool"}
    assert params.variants["scratch"].weights == "none" and not params.variants["baseline"].augment
    assert params.variants["cnn"].epochs == 200 and params.scarcity.variants == ("probe", "cnn")
    assert params.scarcity.images_per_class == (5, 10, 20, 50) and params.collect.external_limit == 3900
    # the default's own recipes are the study's, apart from the CNN's epochs
    for name, variant in default["variants"].items():
        assert {**variant, "epochs": 0} == {**study["variants"][name], "epochs": 0}, name
    for section in ("augment", "synthesize", "finetune", "evaluate", "final"):
        assert default[section] == study[section], section


@pytest.mark.parametrize("overrides, message", [
    ({"collect.colour": 1}, r"unknown key `collect.colour`; allowed keys here: source, folder"),
    ({"variants.cnn.epochs": "ten"}, r"`variants.cnn.epochs` must be of type int; got 'ten'"),
    ({"finetune.lr_head": True}, r"`finetune.lr_head` must be a number"),
    ({"collect.source": "imagenet"}, r"`collect.source` must be one of 'mnist', 'digits', 'lfw', 'folder', 'csv'"),
    ({"collect.channels": 2}, r"`collect.channels` must be one of 1, 3"),
    ({"collect.folds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "collect.images_per_class": 10},
     r"`collect.images_per_class` must be at least the number of folds \(11\)"),
    ({"collect.folds": [1, 2]}, r"`collect.folds` must be the ids 0..n-1 with n >= 2"),
    ({"collect.repeats": []}, r"`collect.repeats` must be the ids 0..n-1 with n >= 1"),
    ({"collect.fit": "stretch"}, r"`collect.fit` must be one of 'crop', 'pad'"),
    ({"collect.label_conflicts": "keep"}, r"`collect.label_conflicts` must be one of 'drop', 'error'"),
    ({"collect.csv": "../elsewhere.csv"}, r"`collect.csv` must be a path inside collect.folder"),
    ({"collect.near_duplicate_bits": 100}, r"`collect.near_duplicate_bits` must be from 0"),
    ({"collect.max_pixels": 10}, r"`collect.max_pixels` must be at least min_side squared"),
    ({"collect.download.retries": 50}, r"`collect.download.retries` must be from 0 to 10"),
    ({"collect.download.timeout": "fast"}, r"`collect.download.timeout` must be a number"),
    ({"collect.download.proxy": "x"}, r"unknown key `collect.download.proxy`"),
    ({"collect.image_size": 2000}, r"`collect.image_size` must be auto or from 16 to 1024 pixels"),
    ({"synthesize.image_size": 48}, r"`synthesize.image_size` must be 0 \(from collect.image_size\) or one of 16, 32"),
    ({"synthesize.discriminator": "features"}, r"`synthesize.discriminator` must be pixels with condition: image"),
    ({"synthesize.condition": "both"}, r"synthesize.condition"),
    ({"synthesize.truncation": 0}, r"`synthesize.truncation` must be in \(0, 1\]"),
    ({"synthesize.filter_views": -1}, r"`synthesize.filter_views` must be >= 0 \(0 = the real images alone\)"),
    ({"synthesize.filter_views": 2.5}, r"synthesize.filter_views"),
    ({"finetune.warmup_epochs": -1}, r"`finetune.warmup_epochs` must be >= 0"),
    ({"finetune.device": "tpu"}, r"`finetune.device` must be one of 'auto', 'cpu', 'cuda'"),
    ({"finetune.synthetic_share": 1.0}, r"`finetune.synthetic_share` must be in \[0, 1\)"),
    ({"finetune.synthetic_weight": 0.0}, r"`finetune.synthetic_weight` must be in \(0, 1\]"),
    ({"finetune.pseudo_threshold": 0.95}, r"`finetune.pseudo_threshold` must be between 0 and 1 - "
                                          r"finetune.label_smoothing \(0.9\), which caps the teacher's confidence"),
    ({"finetune.unlabelled_ratio": 0}, r"`finetune.unlabelled_ratio` must be >= 1"),
    ({"variants.probe.unlabelled": True, "variants.probe.strategy": "partial"},
     r"`variants.probe.unlabelled` must be false unless strategy is full \(FixMatch\) or linear_probe"),
    ({"finetune.self_training_rounds": 0}, r"`finetune.self_training_rounds` must be >= 1"),
    ({"finetune.self_training_share": 0}, r"`finetune.self_training_share` must be in \(0, 1\]"),
    ({"finetune.self_training_share": 1.5}, r"`finetune.self_training_share` must be in \(0, 1\]"),
    ({"scarcity.variants": ["cnn_pool"]}, r"`scarcity.variants \(cnn_pool\)` must be variants without the "
                                          r"unlabelled pool"),
    ({"collect.unlabelled_limit": -1}, r"`collect.unlabelled_limit` must be >= 0"),
    ({"evaluate.label_next": -5}, r"`evaluate.label_next` must be >= 0"),
    ({"evaluate.feature_backbone": "resnet18"}, r"`evaluate.feature_backbone` must be one with packaged weights "
                                                r"\(efficientnet_lite0"),
    ({"finetune.inner_val": 0.9}, r"`finetune.inner_val` must be from 0 \(off\) to 0.5"),
    ({"finetune.ema_decay": 1}, r"`finetune.ema_decay` must be a number|`finetune.ema_decay` must be in \[0, 1\)"),
    ({"finetune.mixup": -0.2}, r"`finetune.mixup` must be >= 0"),
    ({"finetune.compile": "yes"}, r"`finetune.compile` must be of type bool"),
    ({"variants.probe.weights": "imagenet"}, r"`variants.probe.weights` must be packaged, hub, none or file:PATH"),
    ({"variants.probe.weights": "file:"}, r"`variants.probe.weights` must be packaged, hub, none or file:PATH"),
    ({"variants.probe.strategy": "lora"}, r"`variants.probe.strategy` must be one of 'full', 'partial', 'linear_probe'"),
    ({"variants.cnn.input_size": 8}, r"`variants.cnn.input_size` must be from 16 to 1024, or 0"),
    ({"variants.cnn.optimizer": "sgd"}, r"unknown key `variants.cnn.optimizer`"),
    ({"augment.transforms.rotate90": {"p": 1}}, r"unknown transform `augment.transforms.rotate90`; allowed: affine"),
    ({"augment.transforms.affine": {"p": 0.5}}, r"`augment.transforms.affine` must set exactly these options"),
    ({"augment.transforms.hflip": {"p": 1.5}}, r"`augment.transforms.hflip.p` must be a probability"),
    ({"augment.transforms.affine.scale": [1.2, 0.8]}, r"`augment.transforms.affine.scale` must be a \[low, high\]"),
    ({"synthesize.ema_decay": 1.0}, r"`synthesize.ema_decay` must be in \[0, 1\)"),
    ({"scarcity.holdout": -1}, r"`scarcity.holdout` must be >= 0"),
    ({"scarcity.variants": ["cnn", "cnn"]}, r"`scarcity.variants` must be names without repeats"),
    ({"evaluate.test": "wilcoxon"}, r"`evaluate.test` must be one of 'corrected_t', 'bootstrap'"),
    ({"evaluate.bootstrap": 10}, r"`evaluate.bootstrap` must be from 100 to 100000"),
    ({"evaluate.alpha": 0.5}, r"`evaluate.alpha` must be in \(0, 0.5\)"),
    ({"collect.dev_fraction": 1.0}, r"`collect.dev_fraction` must be from 0 \(the whole external set is the final test\)"),
    # a misspelt backbone is refused when params are read, naming the close matches, not at finetune
    ({"variants.probe.backbone": "efficentnet_lite0"},
     r"`variants.probe.backbone` 'efficentnet_lite0' is not a timm model nor compact_cnn; did you mean "
     r"efficientnet_lite0 or efficientnet_lite\d or efficientnet_lite\d\?"),
    ({"variants.cnn.backbone": "compactcnn"}, r"did you mean compact_cnn"),
    ({"variants.probe.backbone": "zzzz_no_such_model"}, r"is not a timm model nor compact_cnn \(see timm"),
    ({"variants.probe.backbone": "resnet18"},
     r"`variants.probe.weights` must be hub, none or file:PATH for resnet18 \(packaged ImageNet weights exist for "
     r"efficientnet_lite0, efficientnet_lite1, efficientnet_lite2\)"),
    ({"synthesize.feature_backbone": "efficientnet_lite9"},
     r"`synthesize.feature_backbone` 'efficientnet_lite9' is not a timm model nor compact_cnn; did you mean"),
])
def test_bad_values_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(PipelineError, match=message):
        parse_params(with_overrides(raw_params(), overrides))


def test_the_backbone_lists_agree_with_the_installed_timm_and_the_packaged_weights():
    import timm

    from pipeline.runtime import params
    from pipeline.training import backbones

    # (importing backbones registers our compact_cnn with timm)
    assert params.timm_models() == frozenset(timm.list_models()) - set(params.OWN_BACKBONES), (
        "pipeline/runtime/timm_models.txt is stale: regenerate it from timm.list_models()")
    assert set(params.PACKAGED_BACKBONES) == set(backbones.PACKAGED_WEIGHTS)
    assert parse_params(with_overrides(raw_params(), {"variants.probe.backbone": "resnet18",
                                                      "variants.probe.weights": "hub"}))


def test_missing_key_is_named():
    raw = raw_params()
    del raw["finetune"]["label_smoothing"]
    with pytest.raises(PipelineError, match=r"missing key `finetune.label_smoothing`"):
        parse_params(raw)


def test_unknown_top_level_section_is_named():
    with pytest.raises(PipelineError, match=r"unknown key `train`"):
        parse_params({**raw_params(), "train": {}})


def test_variant_names_must_be_usable_as_folder_names():
    with pytest.raises(PipelineError, match=r"`variants.my variant`"):
        make_params(**{"variants": {"my variant": raw_params()["variants"]["cnn"]}})


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("collect: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(bad)


def test_params_are_frozen():
    params = make_params()
    with pytest.raises(AttributeError):
        params.finetune.batch_size = 100

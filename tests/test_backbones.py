"""The backbone factory: the packaged ImageNet weights are really loaded, mapped with shape checks."""

import numpy as np
import pytest
import torch
from skimage import data as skdata

from pipeline.runtime.errors import PipelineError
from pipeline.training.backbones import Classifier, create_backbone, map_by_order, packaged_state_dict

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_batch() -> torch.Tensor:
    """scikit-image's photo of Chelsea the cat as a [0, 1] batch; the Classifier does the rest."""
    cat = torch.from_numpy(skdata.chelsea().copy()).permute(2, 0, 1).float().div(255)[None]
    return cat[..., :, 75:375]  # square crop around the cat


def imagenet_probs(backbone) -> torch.Tensor:
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = Classifier(backbone, num_classes=1000, input_size=224)
    model.backbone.load_state_dict(weights)  # put back the ImageNet head that the Classifier replaced
    model.eval()
    with torch.inference_mode():
        return model(chelsea_batch()).softmax(1)[0]


def test_packaged_weights_see_a_cat_random_weights_do_not():
    torch.manual_seed(0)
    probs = imagenet_probs(create_backbone("efficientnet_lite0", "packaged"))
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5
    random_probs = imagenet_probs(create_backbone("efficientnet_lite0", "none"))
    assert float(random_probs[list(CAT_CLASSES)].sum()) < 0.05


def test_mapping_checks_count_and_every_shape():
    source = packaged_state_dict("efficientnet_lite0")
    target = create_backbone("efficientnet_lite0", "none").state_dict()
    mapped = map_by_order(source, target)
    assert list(mapped) == list(target)
    broken = dict(source)
    key = list(broken)[10]
    broken[key] = torch.zeros(7)
    with pytest.raises(PipelineError, match=f"packaged weight {key} has shape"):
        map_by_order(broken, target)
    with pytest.raises(PipelineError, match="tensors but the timm model has"):
        map_by_order(dict(list(source.items())[:-1]), target)


def test_packaged_weights_for_an_unsupported_model_say_what_to_do():
    with pytest.raises(PipelineError, match="weights `packaged` exist only for efficientnet_lite0"):
        create_backbone("resnet18", "packaged")
    with pytest.raises(PipelineError, match="timm has no model named 'no_such_net'"):
        create_backbone("no_such_net", "none")


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 40), (1, 96)])
def test_classifier_takes_grayscale_and_rgb_of_any_size(channels, size):
    model = Classifier(create_backbone("efficientnet_lite0", "none"), num_classes=4, input_size=32).eval()
    with torch.inference_mode():
        logits = model(torch.rand(3, channels, size, size))
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()


def test_input_size_zero_is_the_models_own():
    assert Classifier(create_backbone("efficientnet_lite0", "none"), num_classes=2, input_size=0).input_size == 224
    assert Classifier(create_backbone("compact_cnn", "none"), num_classes=2, input_size=0).input_size == 32


def test_alpha_is_composited_onto_black():
    model = Classifier(create_backbone("compact_cnn", "none"), num_classes=2, input_size=8).eval()
    rgb = torch.rand(2, 3, 8, 8)
    alpha = (torch.arange(64).view(1, 1, 8, 8) % 2).float().expand(2, 1, 8, 8)  # every other pixel transparent
    expected = model.preprocess(rgb * alpha)
    assert torch.allclose(model.preprocess(torch.cat([rgb, alpha], 1)), expected)
    grey = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model.preprocess(torch.cat([grey, alpha], 1)), model.preprocess(grey * alpha))
    assert torch.allclose(model.preprocess(grey), model.preprocess(grey.expand(-1, 3, -1, -1)))


def test_normalisation_comes_from_the_model_config():
    model = Classifier(create_backbone("efficientnet_lite0", "none"), num_classes=2, input_size=32)
    assert np.allclose(model.mean.flatten().tolist(), (0.485, 0.456, 0.406))
    assert np.allclose(model.std.flatten().tolist(), (0.229, 0.224, 0.225))
    body, head = model.param_groups()
    assert len(head) == 2 and len(body) + 2 == len(list(model.parameters()))

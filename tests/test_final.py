"""The final model: trained on every labelled image, saved with its card, exported to TorchScript and ONNX (checked
with onnxruntime on real images), and used by `python -m pipeline.stages.predict` on real files, broken ones included."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data.collected import load_collected
from pipeline.data.decode import Normalise
from pipeline.inference import card as model_card
from pipeline.inference import model as inference
from pipeline.runtime.errors import PipelineError
from pipeline.stages import augment, final, predict

from conftest import ROOT, make_params, stage_env


def fake_evaluation(name: str, recipe: str) -> dict:
    """The parts of evaluate's evaluation.json the final stage reads."""
    interval = {"value": 0.5, "low": 0.4, "high": 0.6}
    return {"best": name, "variants": {name: {"recipe": recipe, "oof": {"accuracy": interval},
                                              "cv": {"accuracy": {"mean": 0.5, "low": 0.4, "high": 0.6}},
                                              "dev": None, "test": None}}}


def settings(params) -> final.FinalSettings:
    collect = params.collect
    image = Normalise(collect.image_size, collect.channels, collect.fit, collect.min_side, collect.max_pixels)
    return final.FinalSettings(params.final, params.finetune, params.synthesize, params.variants, image)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, collected_dir):
    root = tmp_path_factory.mktemp("final")
    params = make_params()
    augment.run(params.augment, collected_dir, root / "augment")
    (root / "evaluation.json").write_text(json.dumps(fake_evaluation("cnn", "compact CNN")))
    inputs = final.FinalInputs(collected_dir, root / "augment" / "policy.json", root / "evaluation.json")
    outputs = final.FinalOutputs(root / "model", root / "final.json")
    card = final.run(settings(params), inputs, outputs)
    assert card["variant"] == "cnn"
    return root / "model"


def test_the_card_says_what_the_model_is_and_what_it_was_trained_on(model_dir, collected_dir):
    card = json.loads((model_dir / "model_card.json").read_text())
    collected = load_collected(collected_dir)
    assert card["classes"] == list(collected.classes) and card["backbone"] == "compact_cnn"
    assert card["trained_on_images"] == len(collected.labelled) == 40
    # collect's limits travel with the model, so predict refuses what collect refused
    assert card["image"] == {"size": 16, "channels": 1, "fit": "crop", "min_side": 16, "max_pixels": 100_000_000}
    assert card["input_size"] == 32
    assert card["data_sha256"] == model_card.manifest_hash(list(collected.labelled.sha256))
    assert card["mean"] == [0.5, 0.5, 0.5] and card["params"]["variant"]["epochs"] == 3
    assert set(card["final_accuracy"]) == {"dev", "test"} and 0.1 <= card["final_accuracy"]["test"] <= 1
    assert json.loads((model_dir.parent / "final.json").read_text()) == {f"{part}_accuracy": value for part, value in
                                                                 card["final_accuracy"].items()}
    markdown = (model_dir / "model_card.md").read_text()
    assert "# Model card: cnn" in markdown and "more than 100,000,000 pixels" in markdown
    assert f"on the final test (external images that chose nothing): {card['final_accuracy']['test']:.3f}" in markdown


def test_exports_match_pytorch_on_real_images(model_dir, collected_dir):
    import onnxruntime

    model, card = inference.load_model(model_dir, torch.device("cpu"))
    images = load_collected(collected_dir).images[-64:]  # external digits the model never saw
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model(x).softmax(1).numpy()
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = torch.from_numpy(session.run(None, {"images": x.numpy()})[0]).softmax(1).numpy()
    assert np.abs(onnx_probs - expected).max() < 1e-4
    scripted = torch.jit.load(str(model_dir / "model.torchscript.pt"))
    with torch.no_grad():
        assert np.abs(scripted(x).softmax(1).numpy() - expected).max() < 1e-5
    assert expected.argmax(1).tolist() == predict.probabilities(model, images, torch.device("cpu"), 7).argmax(1).tolist()


def test_predict_command_reads_files_folders_and_globs_and_reports_bad_files(tmp_path, model_dir, collected_dir):
    collected = load_collected(collected_dir)
    images = collected.images[-6:]
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    files = [tmp_path / "a.png", tmp_path / "folder" / "b.png", tmp_path / "folder" / "sub" / "c.png",
             tmp_path / "g1.png", tmp_path / "g2.png", tmp_path / "g3.png"]
    for path, pixels in zip(files, images):
        Image.fromarray(pixels[..., 0]).save(path)
    (tmp_path / "folder" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "predictions.csv"
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.predict", str(files[0]), str(tmp_path / "folder"),
                           str(tmp_path / "g*.png"), str(tmp_path / "missing.png"), "--model", str(model_dir),
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, env=stage_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # some files failed
    assert "8 files: 6 predicted, 2 could not be read" in done.stdout
    table = pd.read_csv(out, dtype={"path": str, "predicted": str, "error": str})
    table[["predicted", "error"]] = table[["predicted", "error"]].fillna("")
    assert len(table) == 8
    bad = table[table.error != ""]
    assert set(bad.path) == {str(tmp_path / "folder" / "broken.png"), str(tmp_path / "missing.png")}
    assert bad.error.str.contains("unreadable|no such file").all()
    # the files hold exactly the stored pixels, so the command must agree with the model on the arrays
    model, card = inference.load_model(model_dir, torch.device("cpu"))
    expected = predict.probabilities(model, images, torch.device("cpu"), 32)
    good = table[table.error == ""].set_index("path")
    for path, probs in zip(files, expected):
        row = good.loc[str(path)]
        assert row.predicted == card["classes"][probs.argmax()]
        assert np.allclose([row[f"p_{c}"] for c in card["classes"]], probs, atol=1e-5)


def test_a_linear_probe_becomes_one_network_with_the_scaler_folded_into_its_head(tmp_path, collected_dir):
    params = make_params()
    augment.run(params.augment, collected_dir, tmp_path / "augment")
    (tmp_path / "evaluation.json").write_text(json.dumps(fake_evaluation("probe", "probe")))
    inputs = final.FinalInputs(collected_dir, tmp_path / "augment" / "policy.json", tmp_path / "evaluation.json")
    card = final.run(settings(params), inputs, final.FinalOutputs(tmp_path / "model", tmp_path / "final.json"))
    model, _ = inference.load_model(tmp_path / "model", torch.device("cpu"))
    collected = load_collected(collected_dir)
    images, targets = collected.select(collected.part("test"))
    probs = predict.probabilities(model, images, torch.device("cpu"), 64)
    # the folded network reproduces the probe's own predictions, which the card's accuracy was computed from
    assert (probs.argmax(1) == targets).mean() == pytest.approx(card["final_accuracy"]["test"], abs=1 / len(targets))
    assert card["final_accuracy"]["test"] > 0.2  # frozen ImageNet features on 40 digits: well above chance


def test_a_variant_with_gan_samples_gets_a_gan_trained_on_every_labelled_image(tmp_path, collected_dir):
    params = make_params(final__variant="cnn_synthetic", synthesize__keep_per_class=6,
                         synthesize__min_confidence=0.0)  # keep samples even from a 20-step GAN
    augment.run(params.augment, collected_dir, tmp_path / "augment")
    (tmp_path / "evaluation.json").write_text(json.dumps(fake_evaluation("cnn_synthetic", "cnn + GAN")))
    inputs = final.FinalInputs(collected_dir, tmp_path / "augment" / "policy.json", tmp_path / "evaluation.json")
    card = final.run(settings(params), inputs, final.FinalOutputs(tmp_path / "model", tmp_path / "final.json"))
    assert card["variant"] == "cnn_synthetic" and card["gan"]["samples"] == 60  # 6 kept of 6 per class
    assert card["gan"]["params"]["steps"] == params.synthesize.steps and "fid_accepted" in card["gan"]
    assert (tmp_path / "model" / "model.onnx").exists()


def test_a_semi_supervised_winner_learns_from_the_whole_pool(tmp_path, collected_dir):
    params = make_params(final__variant="cnn_pool")
    augment.run(params.augment, collected_dir, tmp_path / "augment")
    (tmp_path / "evaluation.json").write_text(json.dumps(fake_evaluation("cnn_pool", "cnn + unlabelled pool")))
    inputs = final.FinalInputs(collected_dir, tmp_path / "augment" / "policy.json", tmp_path / "evaluation.json")
    card = final.run(settings(params), inputs, final.FinalOutputs(tmp_path / "model", tmp_path / "final.json"))
    pool = load_collected(collected_dir).unlabelled
    assert card["variant"] == "cnn_pool" and card["unlabelled_images"] == len(pool) > 0  # no fold: all of it
    assert f"and {len(pool)} unlabelled ones" in (tmp_path / "model" / "model_card.md").read_text()


def gan_comparison(difference: float, significant: bool) -> dict:
    """evaluate's record of cnn -> cnn_synthetic (the one setting `synthetic` changed)."""
    return {"what": "GAN samples: off → on", "setting": "synthetic", "a": "cnn", "b": "cnn_synthetic",
            "difference": difference, "p_holm": 0.01 if significant else 0.4, "significant": significant}


def test_a_gan_variant_that_won_by_noise_gives_way_to_its_twin_without_gan_samples():
    variants, final_params = make_params().variants, make_params().final
    evaluation = fake_evaluation("cnn_synthetic", "cnn + GAN")
    best_vs_other = {"what": "best (cnn_synthetic) against probe", "setting": None, "a": "probe",
                     "b": "cnn_synthetic", "difference": 0.2, "p_holm": 0.01, "significant": True}
    evaluation["comparisons"] = [gan_comparison(0.01, False), best_vs_other]
    assert model_card.choose(final_params, variants, evaluation) == "cnn"
    assert "not a significant gain, so the model is cnn" in model_card.choice_note("cnn", evaluation)
    evaluation["comparisons"] = [gan_comparison(-0.03, True), best_vs_other]  # significantly worse cannot win either
    assert model_card.choose(final_params, variants, evaluation) == "cnn"
    evaluation["comparisons"] = [gan_comparison(0.03, True), best_vs_other]  # a significant gain: the GAN stays
    assert model_card.choose(final_params, variants, evaluation) == "cnn_synthetic"
    assert model_card.choice_note("cnn_synthetic", evaluation) is None
    # named explicitly, a GAN variant is what the user asked for
    evaluation["comparisons"] = [gan_comparison(0.01, False)]
    assert model_card.choose(make_params(final__variant="cnn_synthetic").final, variants, evaluation) == "cnn_synthetic"


def test_best_means_the_evaluations_first_and_unknown_names_are_refused():
    variants = make_params().variants
    assert model_card.choose(make_params().final, variants, fake_evaluation("probe", "")) == "probe"
    assert model_card.choose(make_params(final__variant="cnn").final, variants, fake_evaluation("probe", "")) == "cnn"
    with pytest.raises(PipelineError, match="`final.variant` must be best or a name from `variants`"):
        make_params(final__variant="nope")


@pytest.mark.gpu
def test_prediction_on_cuda_agrees_with_the_cpu(model_dir, collected_dir):
    """bf16 and channels-last on the GPU: the same classes as on the CPU for nearly every image."""
    images = load_collected(collected_dir).images[-200:]
    on = {}
    for name in ("cpu", "cuda"):
        model, _ = inference.load_model(model_dir, torch.device(name))
        if name == "cuda":
            model = model.to(memory_format=torch.channels_last)
        on[name] = predict.probabilities(model, images, torch.device(name), 32)
    assert (on["cpu"].argmax(1) == on["cuda"].argmax(1)).mean() >= 0.97
    assert np.abs(on["cpu"] - on["cuda"]).max() < 0.05


def test_the_card_of_a_winner_says_its_figures_were_chosen_and_gives_the_procedures_estimate(model_dir):
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["selection"] is None  # the only variant evaluated: nothing was chosen
    evaluation = fake_evaluation("cnn", "compact CNN")
    evaluation["variants"]["probe"] = evaluation["variants"]["cnn"]
    evaluation["selection"] = {"method": "leave-one-fold-out selection",
                               "accuracy": {"mean": 0.41, "low": 0.30, "high": 0.52}}
    note = model_card.selection_note("cnn", evaluation)
    assert note["chosen_among"] == 2 and note["accuracy"]["mean"] == 0.41 and "optimistic" in note["note"]
    assert model_card.selection_note("probe", evaluation) is None  # asked for by name, not chosen
    text = model_card.card_markdown({**card, "selection": note})
    assert "Chosen as the best of 2 variants on the same folds" in text and "0.410 per fold model (0.300 to 0.520)" in text

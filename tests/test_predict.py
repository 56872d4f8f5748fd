"""`python -m pipeline.stages.predict` on files that should not stop it: decompression bombs (refused from the header,
as collect refuses them), folders and files that cannot be read, links that lead nowhere, FIFOs; and files read a
batch at a time with the numbers one pass over all of them would give."""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data.decode import Unusable, decode_file
from pipeline.data.sources import normalise_settings
from pipeline.inference import model as inference
from pipeline.stages import predict
from pipeline.training.backbones import Classifier, create_backbone

from conftest import ROOT, digit_images, make_params, stage_env

CPU = torch.device("cpu")
PR_CAPBSET_DROP = 24  # prctl option, from <linux/prctl.h>
# A child that runs the command and says how much its peak memory grew while it did (imports excluded)
MEASURED = """
import resource, sys
from pipeline.stages import predict
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    predict.main(sys.argv[1:])
except SystemExit:
    pass
print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def bomb_png(path: Path, side: int) -> None:
    """A real 1-bit black PNG of side x side pixels, a few hundred KB on disk and side² bytes once Pillow decodes
    it. Written row by row through zlib, so making it does not take the memory decoding it would."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte, then 8 pixels a byte
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def compact_model(folder: Path, **limits) -> Path:
    """A compact CNN (random weights: these tests are about which files get predicted) with a 16 px card."""
    model = Classifier(create_backbone("compact_cnn", "none"), num_classes=3, input_size=0)
    card = {"classes": ["0", "1", "2"], "backbone": "compact_cnn", "input_size": model.input_size,
            "image": {"size": 16, "channels": 1, "fit": "crop", **limits}}
    inference.save_model(folder, model, card)
    return folder


def write_digits(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    digits = [d for per_class in digit_images(4, size=24).values() for d in per_class]
    paths = [folder / name for name in names]
    for path, digit in zip(paths, digits):
        Image.fromarray(digit).save(path)
    return paths


def test_a_decompression_bomb_is_refused_from_its_header_as_collect_refuses_it(tmp_path):
    side = 30_000  # the file: 900 million pixels, 0.1 MB on disk; predict used to peak at 4.2 GB on it
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, side)
    good = write_digits(tmp_path / "good", ["digit.png"])[0]
    model = compact_model(tmp_path / "model", min_side=16, max_pixels=100_000_000)
    out = tmp_path / "predictions.csv"
    done = subprocess.run([sys.executable, "-c", MEASURED, str(good), str(bomb), "--model", str(model),
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, env=stage_env(), capture_output=True,
                          text=True, timeout=300)
    table = pd.read_csv(out, keep_default_na=False)
    assert table.path.tolist() == [str(good), str(bomb)] and table.error[0] == "" and table.predicted[1] == ""
    with pytest.raises(Unusable) as collect:  # what collect's own settings make of the same file
        decode_file(bomb, normalise_settings(make_params().collect))
    assert table.error[1].startswith(f"{collect.value.category}: ")
    assert f"{side} x {side} pixels" in table.error[1] and "100,000,000" in table.error[1]
    # decoding would hold at least one byte a pixel (900 MB); the refusal came from the header, before that
    grew = int(done.stdout.split("grew_kib")[-1]) * 1024
    assert grew < side * side / 4, done.stderr[-2000:]


def test_old_cards_get_collects_default_limit_and_max_pixels_overrides_the_card(tmp_path):
    digit = write_digits(tmp_path, ["digit.png"])[0]  # 24 x 24 = 576 pixels
    named = inference.Named(str(digit), digit)
    old = {"image": {"size": 16, "channels": 1, "fit": "crop"}}  # a card written before it carried the limits
    assert inference.preparation(old).max_pixels == 100_000_000
    strict = {"image": {**old["image"], "min_side": 16, "max_pixels": 500}}
    refused = inference.read_image(named, inference.preparation(strict))
    assert refused.image is None and refused.error.startswith("too large: 24 x 24 pixels") and "500" in refused.error
    assert inference.read_image(named, inference.preparation(strict, max_pixels=576)).image.shape == (16, 16, 1)
    assert inference.read_image(named, inference.preparation(strict, max_pixels=0)).error == ""  # 0: no limit
    small = inference.read_image(named, inference.preparation({"image": {**strict["image"], "min_side": 32}}, 0))
    assert small.error.startswith("too small: 24 x 24 pixels")
    model_dir = compact_model(tmp_path / "model", min_side=16, max_pixels=500)  # the command, card and override
    assert predict.run([str(digit)], model_dir, CPU).error[0].startswith("too large")
    assert predict.run([str(digit)], model_dir, CPU, max_pixels=576).error[0] == ""


def without_root_privileges() -> None:
    """In a child before it starts: root keeps its uid but loses the capabilities that let it read past permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped from the bounding set, so the program it runs never has them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_unreadable_folders_files_links_and_fifos_become_rows_with_their_error(tmp_path):
    """When the tests run as root, for whom chmod 000 stops nothing, the command runs without root's capabilities."""
    work = tmp_path
    good = write_digits(work, ["good.png"])[0]
    tree = work / "tree"
    write_digits(tree, ["a.png", "b.png", "secret.png"])
    write_digits(tree / "hidden", ["c.png"])
    write_digits(work / "locked", ["d.png"])
    (tree / "notes.txt").write_text("not an image, not a row")
    os.symlink("loop.png", tree / "loop.png")  # a link to itself: ELOOP, even for root
    os.symlink("gone.png", tree / "dangling.png")
    os.symlink(".", tree / "again")  # a link back to its own folder: not followed, so the search ends
    os.mkfifo(tree / "pipe.png")  # opening it would wait for a writer for ever
    for path in (tree / "secret.png", tree / "hidden", work / "locked"):
        path.chmod(0)
    model = compact_model(work / "model", min_side=16, max_pixels=100_000_000)
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.predict", str(good), str(work / "locked"),
                           str(tree), str(good / "inside.png"), str(work / "missing*.png"), "--model", str(model),
                           "--device", "cpu", "--out", str(work / "p.csv")], cwd=ROOT, env=stage_env(),
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=without_root_privileges if os.geteuid() == 0 else None)
    assert done.returncode == 1, done.stderr[-2000:]
    table = pd.read_csv(work / "p.csv", keep_default_na=False)
    expected = {str(good): "", str(work / "locked"): "unreadable folder: Permission denied",
                str(tree / "a.png"): "", str(tree / "b.png"): "",
                str(tree / "dangling.png"): "unreadable: [Errno 2] No such file or directory",
                str(tree / "hidden"): "unreadable folder: Permission denied",
                str(tree / "loop.png"): "unreadable: [Errno 40] Too many levels of symbolic links",
                str(tree / "pipe.png"): "unreadable: not a regular file",
                str(tree / "secret.png"): "unreadable: [Errno 13] Permission denied",
                str(good / "inside.png"): "unreadable: Not a directory",
                str(work / "missing*.png"): "no such file, folder or matching glob"}
    assert table.path.tolist() == list(expected)
    for error, start in zip(table.error, expected.values()):
        assert error.startswith(start) and (error == "") == (start == "")
    assert (table.predicted != "").sum() == 3 and "11 files: 3 predicted, 8 could not be read" in done.stdout


def test_files_are_read_a_batch_at_a_time_with_the_numbers_of_one_pass(tmp_path):
    names = [f"{i:02d}.png" for i in range(10)]
    files = write_digits(tmp_path / "images", names)
    broken = {files[2], files[5]}
    for path in broken:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model_dir = compact_model(tmp_path / "model", min_side=16, max_pixels=100_000_000)
    table = predict.run([str(tmp_path / "images")], model_dir, CPU, batch=3)
    assert table.path.tolist() == [str(f) for f in files] and (table.error != "").tolist() == [
        i in (2, 5) for i in range(10)]
    model, card = inference.load_model(model_dir, CPU)
    how = inference.preparation(card)
    usable = [inference.read_image(inference.Named(str(f), f), how).image for f in files if f not in broken]
    expected = predict.probabilities(model, np.stack(usable), CPU, 3)
    # the same images in the same forward passes: equal to float32 rounding (in the full suite on a 2-core AMD
    # machine, 2026-12-01, the two passes differed in the last bits; alone they were bit for bit the same)
    got = table.loc[table.error == "", ["p_0", "p_1", "p_2"]].to_numpy()
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert table.predicted[table.error == ""].tolist() == [card["classes"][i] for i in expected.argmax(1)]


def test_batches_hold_at_most_batch_images_and_do_not_wait_for_the_end():
    image, bad = np.zeros((2, 2, 1), np.uint8), None
    reads = [inference.Read(str(i), image if i % 3 else bad, "" if i % 3 else "broken") for i in range(8)]
    chunks = list(predict.batches(reads, 2))
    assert [r for chunk in chunks for r in chunk] == reads  # every row, in order
    assert [sum(r.image is not None for r in chunk) for chunk in chunks] == [2, 2, 1]
    endless = (inference.Read(str(i), image) for i in itertools.count())
    assert len(next(predict.batches(endless, 4))) == 4  # an endless stream still yields its first batch

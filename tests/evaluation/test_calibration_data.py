import json

import numpy as np
import pytest
import torch

from bitsmith import BitsmithError
from bitsmith.evaluation.calibration_data import read_calibration


def test_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n second \n")
    assert read_calibration(tmp_path / "a.txt", 10) == ["first line", "second"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert read_calibration(tmp_path / "b.jsonl", 1) == ["x"]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(BitsmithError, match="line 2 is not valid JSON"):
        read_calibration(tmp_path / "c.jsonl", 10)


def test_tensor_and_image_folders(tmp_path):
    from PIL import Image

    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.full((1, 8, 8), i, dtype=np.float32))
    torch.save(torch.ones(1, 8, 8), tmp_path / "3.pt")
    samples = read_calibration(tmp_path, 10)
    assert len(samples) == 4 and samples[2].shape == (1, 8, 8) and samples[2].max() == 2
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(images / "white.png")
    (image,) = read_calibration(images, 10)
    assert image.shape == (1, 8, 8) and image.max() == 1.0


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_sets_are_errors(tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(BitsmithError, match="is empty"):
        read_calibration(tmp_path / "empty.txt", 10)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BitsmithError, match="is empty"):
        read_calibration(tmp_path / "folder", 10)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(BitsmithError, match="calibration set not found"):
        read_calibration(tmp_path / "nope.txt", 10)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(BitsmithError, match="cannot read calibration tensor"):
        read_calibration(tmp_path / "bad.npy", 10)
    with pytest.raises(BitsmithError, match="must be a whole number of at least 1, got 0"):
        read_calibration(tmp_path / "bad.npy", 0)

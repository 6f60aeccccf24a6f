"""``cli.py explain``: attention pictures from the map the forward really applied."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import bam_zoo
from bam_zoo.cli import main
from bam_zoo.errors import NoImagesError
from bam_zoo.explain import explain
from bam_zoo.training.data import image_files

pytest.importorskip("matplotlib")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    torch.manual_seed(0)
    for i, where in enumerate([folder / "a.png", folder / "sub" / "b.png"]):
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(where)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_files_finds_files_in_folders_and_rejects_missing(images):
    assert [p.name for p in image_files(str(images), "x")] == ["a.png", "b.png"]  # recursive, sorted, images only
    named = [str(images / "sub" / "b.png"), str(images)]
    assert [p.name for p in image_files(named, "x")] == ["b.png", "a.png", "b.png"]  # in the order named
    with pytest.raises(NoImagesError, match="explain --images: .*missing.png is neither an image file nor a folder"):
        image_files([str(images / "missing.png")], "explain --images")
    (images / "empty").mkdir()
    with pytest.raises(NoImagesError, match="empty holds no images"):
        image_files(str(images / "empty"), "x")
    with pytest.raises(NoImagesError, match="names no images"):
        image_files([], "x")


def test_explain_writes_one_png_per_image_and_an_overview(images, tmp_path, capsys):
    out = tmp_path / "out"
    main(["explain", "--model", "bam_resnet20.fmnist", "--images", str(images), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)  # the command prints where the pictures are
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.png", "b.png", "overview.png"]
    for name in written:
        with Image.open(out / name) as picture:
            assert picture.size[0] > 200 and picture.size[1] > 100
            assert len(set(picture.convert("L").getdata())) > 20  # drawn, not blank


def test_explain_names_a_missing_image_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["explain", "--model", "bam_resnet20.fmnist", "--images", str(tmp_path / "nope.png")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bam-zoo: error: explain --images: {tmp_path / 'nope.png'} is neither an image file nor")
    assert len(err.splitlines()) == 1


def test_explain_shows_the_attention_the_forward_applied(images, monkeypatch, tmp_path):
    """The pictures are drawn from capture_attention's maps: the channel mean over the image of the map."""
    model = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True).eval()
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.imshow

    def record(self, data, *args, **kwargs):
        drawn.append((kwargs.get("cmap"), torch.as_tensor(data) if isinstance(data, torch.Tensor) else None))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", record)
    explain("bam_resnet20.fmnist", str(images / "a.png"), str(tmp_path / "out"))
    x = torch.from_numpy(np.asarray(Image.open(images / "a.png"), dtype="float32"))[None, None] / 255
    cfg = model.pretrained_cfg
    with torch.no_grad(), bam_zoo.capture_attention(model) as maps:
        model((x - cfg["mean"][0]) / cfg["std"][0])
    inputs = [data for cmap, data in drawn if cmap == "gray"]
    assert torch.allclose(inputs[0], x[0, 0], atol=1e-5)  # the picture is what the network saw, in [0, 1]
    overlays = [data for cmap, data in drawn if cmap == "jet"]
    assert overlays, "no attention overlay was drawn"
    expected = maps["layer1.bam"][0].mean(0)  # 28 x 28 already: upsampling to 28 x 28 changes nothing
    assert torch.allclose(overlays[0], expected, atol=1e-5)


def test_explain_refuses_a_model_without_bam(images, tmp_path):
    with pytest.raises(ValueError, match="no BAM module"):
        explain("resnet20.fmnist", str(images), str(tmp_path / "out"))

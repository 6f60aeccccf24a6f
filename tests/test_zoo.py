"""The shipped zoo: every weight loads by name from the offline mirror and measures what its card says."""
from pathlib import Path

import pytest
import torch

import bam_zoo
from bam_zoo.evaluate import evaluate
from bam_zoo.model_card import render_model_card
from bam_zoo.models.pretrained import FASHION_MNIST_TAGS, WEIGHT_METADATA

FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
MODEL_CARD = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"
README = MODEL_CARD.with_name("README.md")


def test_model_card_is_rendered_from_the_weight_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the check must not depend on where pytest was started
    with open(MODEL_CARD) as f:
        assert f.read() == render_model_card(), "MODEL_CARD.md is stale: python -m bam_zoo.model_card > MODEL_CARD.md"


def test_readme_weight_table_states_the_recorded_numbers():
    """README's "Pretrained weights" table is written by hand: each row must say what the metadata records."""
    rows = {line.split("`")[1]: [c.strip() for c in line.split("|")[2:7]]
            for line in README.read_text().split("## Pretrained weights", 1)[1].split("\n\n", 2)[1].splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(FASHION_MNIST_TAGS)
    for name, (params, macs, top1, top5, flip) in rows.items():
        meta = WEIGHT_METADATA[name]
        assert (params, macs) == (f"{meta['num_params'] / 1e6:.3f}M", f"{meta['macs'] / 1e6:.2f}M"), name
        assert (top1, top5, flip) == (f"{meta['top1']:.2f}", f"{meta['top5']:.2f}", f"{meta['top1_flip']:.2f}"), name


def test_every_tag_has_metadata_and_a_mirrored_twin():
    converted = {n for n, meta in WEIGHT_METADATA.items() if "source" in meta}
    assert converted == {"bam_resnet50.imgclsmob_in1k"} and set(FASHION_MNIST_TAGS) == set(WEIGHT_METADATA) - converted
    for name in FASHION_MNIST_TAGS:
        if name.startswith("bam_"):
            assert name[len("bam_"):] in FASHION_MNIST_TAGS, f"{name} ships without its plain twin"
    listed = {p.name: p for p in bam_zoo.list_pretrained()}
    assert set(listed) == set(WEIGHT_METADATA)
    assert all(listed[n].mirrored and listed[n].metrics["top1"] == WEIGHT_METADATA[n]["top1"]
               for n in FASHION_MNIST_TAGS)
    imagenet = listed["bam_resnet50.imgclsmob_in1k"]  # converted on load, never measured here: no metrics
    assert imagenet.metrics == {} and not imagenet.mirrored and "osmr/imgclsmob" in imagenet.extra["source"]


def test_evaluate_names_the_tags_it_cannot_measure(capsys):
    from bam_zoo.evaluate import main
    with pytest.raises(SystemExit):
        main(["bam_resnet50.imgclsmob_in1k"])
    assert "not Fashion-MNIST weights" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(FASHION_MNIST_TAGS))
def test_shipped_weight_measures_its_recorded_numbers(name, monkeypatch):
    pytest.importorskip("pytorch_lightning")
    import os
    if not os.path.exists(FMNIST):
        pytest.skip("needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    meta = WEIGHT_METADATA[name]
    result = evaluate(name)
    assert result["images"] == 10000
    assert result["top1"] == pytest.approx(meta["top1"], abs=0.05)
    assert result["top5"] == pytest.approx(meta["top5"], abs=0.05)
    assert result["top1_flip"] == pytest.approx(meta["top1_flip"], abs=0.05)
    assert result["params"] == meta["num_params"] and result["macs"] == meta["macs"]


def test_pretrained_fine_tune_adaptation():
    """The deliberate adaptation: new head and RGB stem, everything else loaded strictly."""
    ref = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True)
    model = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True, num_classes=5, in_chans=3)
    assert model.fc.out_features == 5 and model.conv1.in_channels == 3
    torch.testing.assert_close(model.layer1.bam.channel_attn.fc1.weight, ref.layer1.bam.channel_attn.fc1.weight)
    torch.testing.assert_close(model.conv1.weight.sum(1, keepdim=True), ref.conv1.weight)

"""The shipped zoo: every weight loads by name from the offline mirror and measures what its card says."""
import json
from pathlib import Path

import pytest
import torch

import bam_zoo
from _helpers import load_script
from bam_zoo.evaluate import evaluate
from bam_zoo.models.pretrained import FASHION_MNIST_TAGS, FASHION_MNIST_TWINS, WEIGHT_METADATA, sha256sum, weight_facts

FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
REPO = Path(__file__).resolve().parents[1]
MODEL_CARD = REPO / "MODEL_CARD.md"
README = REPO / "README.md"
model_card = load_script(REPO / "scripts" / "model_card.py", "model_card")  # a maintainer script, outside the package


def test_model_card_is_rendered_from_the_weights_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the check must not depend on where pytest was started
    with open(MODEL_CARD) as f:
        assert f.read() == model_card.render_model_card(REPO), (
            "MODEL_CARD.md is stale: python scripts/model_card.py > MODEL_CARD.md")


def test_readme_weight_table_is_the_rendered_one():
    start, end = model_card.README_TABLE_MARKERS
    text = README.read_text()
    if start not in text or end not in text:
        pytest.xfail(f"README.md has no {start} ... {end} block yet")
    block = text.split(start + "\n", 1)[1].split(end, 1)[0]
    assert block == model_card.render_weight_table(REPO), (
        "README.md's weight table is stale: put `python scripts/model_card.py --readme-table` between its markers")


def test_every_tag_has_its_facts_its_hash_and_a_mirrored_twin():
    converted = {n for n, meta in WEIGHT_METADATA.items() if "source" in meta}
    assert converted == {"bam_resnet50.imgclsmob_in1k"} and set(FASHION_MNIST_TAGS) == set(WEIGHT_METADATA) - converted
    for bam_name, twin in FASHION_MNIST_TWINS.items():  # the twin: the same recipe (bam_X.yaml's X.yaml), length, seed
        b, t = weight_facts(bam_name), weight_facts(twin)
        assert (b["recipe"].replace("/bam_", "/"), b["epochs"], b["seed"]) == (t["recipe"], t["epochs"], t["seed"])
        assert bam_zoo.bam_modules(bam_zoo.create_model(bam_name)) and not bam_zoo.bam_modules(
            bam_zoo.create_model(twin)), f"{bam_name}: a BAM weight and a plain twin"
    for name in FASHION_MNIST_TAGS:
        folder = REPO / "checkpoints" / name
        assert sha256sum(folder / "model.safetensors") == WEIGHT_METADATA[name]["sha256"], name
        config = json.loads((folder / "config.json").read_text())["bam_zoo"]
        assert config["model_name"] == name and config["metrics"].items() <= config["details"].items(), name
        facts = weight_facts(name)
        model = bam_zoo.create_model(name)  # the tag's architecture, input and classes; no weights
        assert (facts["num_params"], facts["macs"]) == (bam_zoo.count_params(model),
                                                         bam_zoo.count_macs(model, (1, 28, 28))), name
        assert set(facts["per_class"]) == set(FASHION_MNIST_TAGS[name]["label_names"]), name
    listed = {p.name: p for p in bam_zoo.list_pretrained()}
    assert set(listed) == set(WEIGHT_METADATA)
    for name in FASHION_MNIST_TAGS:
        details = json.loads((REPO / "checkpoints" / name / "config.json").read_text())["bam_zoo"]["details"]
        assert listed[name].mirrored and listed[name].dataset == "fashion_mnist"
        assert listed[name].metrics == {"top1": details["top1"], "top5": details["top5"]}, name
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
    meta = weight_facts(name)
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


ship_weights = load_script(REPO / "scripts" / "ship_weights.py", "ship_weights")


@pytest.mark.parametrize("recorded_top1", ["measured", 90.0])
def test_ship_weights_ships_a_fine_tune_with_its_lineage(tmp_path, monkeypatch, recorded_top1):
    """A run that added BAM to a shipped weight ships as bam_inserted, with where it started and the time of both;
    a run record the exported weights do not reproduce ships nothing."""
    if not Path(FMNIST).exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)")
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = weight_facts("resnet20.fmnist")
    model = bam_zoo.create_model("resnet20.fmnist", pretrained=True, add_bam=True)  # the identity start: base's top-1
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
    top1 = base["top1"] if recorded_top1 == "measured" else recorded_top1
    (export / "metrics.json").write_text(json.dumps({
        "model_name": "resnet20.fmnist", "model_args": {"num_classes": 10, "in_chans": 1, "add_bam": True},
        "test": {"acc1": top1 / 100, "acc5": base["top5"] / 100}, "epochs": 1, "train_wall_time_s": 60.0,
        "per_class_acc1": {k: v / 100 for k, v in base["per_class"].items()},
        "recipe": {"seed_everything": 0, "model": {"model_name": "resnet20.fmnist", "pretrained": True}}}))
    command = ("python cli.py fit --config configs/fashion_mnist/resnet20.yaml --model.model_name resnet20.fmnist "
               "--model.pretrained true --model.add_bam true")
    argv = ["ship_weights.py", str(export), "bam_inserted.resnet20_try", "--out", str(tmp_path), "--command", command]
    monkeypatch.setattr("sys.argv", argv)
    if recorded_top1 != "measured":
        with pytest.raises(SystemExit, match="export and run disagree, nothing shipped"):
            ship_weights.main()
        assert not (tmp_path / "bam_inserted.resnet20_try").exists()
        return
    ship_weights.main()
    folder = tmp_path / "bam_inserted.resnet20_try"
    config = json.loads((folder / "config.json").read_text())
    details = config["bam_zoo"]["details"]
    assert config["architecture"] == "bam_inserted" and config["model_args"]["base_model"] == "resnet20"
    assert "add_bam" not in config["model_args"] and "`layer1` (16 ch" in details["architecture"]
    assert (details["fine_tuned_from"], details["base_command"]) == ("resnet20.fmnist", base["command"])
    assert details["total_train_time_s"] == base["train_time_s"] + 60 and details["top1"] == base["top1"]
    assert "Fine-tuned from `resnet20.fmnist`" in (folder / "README.md").read_text()
    assert details["train_setting"].startswith("2-core CPU (")  # no machine.txt beside the export: this machine
    shipped = bam_zoo.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(shipped(x), model.eval()(x))


def test_a_warm_restart_from_a_kept_run_ships_its_whole_lineage(tmp_path, monkeypatch):
    """A run that began from a kept run's export (a further cycle) records that run's command and time, where that
    run began, and the time of all three trainings; a start without its records ships nothing."""
    if not Path(FMNIST).exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (scripts/setup.sh installs it)")
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = weight_facts("resnet20.fmnist")
    model = bam_zoo.create_model("resnet20.fmnist", pretrained=True, add_bam=True)
    inserted = {k: model.bam_insertion[k] for k in ("base_model", "bam_stages")}
    first, second = tmp_path / "cycle1" / "export", tmp_path / "cycle2" / "export"
    for export, start, minutes in ((first, {"model_name": "resnet20.fmnist", "pretrained": True}, 3),
                                   (second, {"model_name": "bam_inserted", "pretrained_file": str(first)}, 2)):
        export.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
        (export / "metrics.json").write_text(json.dumps({
            "model_name": start["model_name"], "model_args": {"num_classes": 10, "in_chans": 1, **inserted},
            "test": {"acc1": base["top1"] / 100, "acc5": base["top5"] / 100}, "epochs": 5,
            "train_wall_time_s": 60.0 * minutes, "per_class_acc1": {k: v / 100 for k, v in base["per_class"].items()},
            "recipe": {"seed_everything": 0, "model": start}}))
    # as seed_study writes it: each start of the run resumes from its last checkpoint
    (first.parent / "command.txt").write_text("python cli.py fit --config configs/fashion_mnist/resnet20.yaml "
                                              "--ckpt_path last\n")
    command = f"python cli.py fit --config configs/fashion_mnist/resnet20.yaml --model.pretrained_file {first}"
    argv = ["ship_weights.py", str(second), "bam_inserted.resnet20_cycle2", "--out", str(tmp_path), "--command"]
    monkeypatch.setattr("sys.argv", [*argv, command])
    ship_weights.main()
    details = json.loads((tmp_path / "bam_inserted.resnet20_cycle2" / "config.json").read_text())["bam_zoo"]["details"]
    assert (details["fine_tuned_from"], details["base_fine_tuned_from"]) == (str(first), "resnet20.fmnist")
    assert details["base_command"] == "python cli.py fit --config configs/fashion_mnist/resnet20.yaml"
    assert (details["base_train_time_s"], details["train_time_s"]) == (180, 120)
    assert details["total_train_time_s"] == base["train_time_s"] + 180 + 120
    assert model_card.started_from(details) == "fine-tune of `resnet20.fmnist` after a kept fine-tune: "
    (first.parent / "command.txt").unlink()
    monkeypatch.setattr("sys.argv", [*argv[:2], "bam_inserted.resnet20_lost", *argv[3:], command])
    with pytest.raises(SystemExit, match="neither a shipped weight nor a kept run export"):
        ship_weights.main()
    assert not (tmp_path / "bam_inserted.resnet20_lost").exists()


def test_a_run_that_spanned_machines_says_where_each_start_trained():
    machines = ["NVIDIA H200, torch 2.11.0+cu130", "2 CPU cores (AMD EPYC), torch 2.14.1+cu130"]
    setting = ship_weights.train_setting("OMP_NUM_THREADS=1 python cli.py fit", machines)
    assert setting == ("NVIDIA H200, torch 2.11.0+cu130; then 2 CPU cores (AMD EPYC), torch 2.14.1+cu130; "
                       "on the CPU one thread, with another run on the other core")
    assert ship_weights.train_setting("python cli.py fit", machines[:1]) == machines[0]


def test_a_fine_tune_of_a_fine_tune_counts_all_training_back_to_the_first_weight():
    """Lineage chains: starting from the shipped fine-tune adds its whole training time, not only its last step,
    and the card names where that start itself began."""
    from bam_zoo.hub import render_details
    start = weight_facts("bam_inserted.resnet56_fmnist_long_ft")
    facts = ship_weights.lineage("bam_inserted.resnet56_fmnist_long_ft", 600.0)
    assert facts["total_train_time_s"] == start["total_train_time_s"] + 600 > start["train_time_s"] + 600
    assert facts["base_fine_tuned_from"] == "resnet56.fmnist_long"
    assert facts["base_train_time_s"] == start["train_time_s"]
    line = render_details(facts)
    assert "(itself fine-tuned from `resnet56.fmnist_long`)" in line and "all together" in line, line
    assert "base_fine_tuned_from" not in ship_weights.lineage("resnet56.fmnist_long", 600.0)


def test_an_inserted_tag_builds_the_bams_its_model_args_name(monkeypatch):
    """Every add_bam argument a bam_inserted tag records reaches add_bam, none the base network."""
    entry = WEIGHT_METADATA["bam_inserted.resnet56_fmnist_long_ft"]
    monkeypatch.setitem(entry, "model_args", {**entry["model_args"], "bam_args": {"fusion": "product"},
                                              "identity_init": False})
    model = bam_zoo.create_model("bam_inserted.resnet56_fmnist_long_ft")
    assert model.bam_insertion == {"base_model": "resnet56", "bam_stages": ["layer1", "layer2"],
                                   "identity_init": False, "bam_args": {"fusion": "product"}}
    assert [bam.fusion for _, bam in bam_zoo.bam_modules(model)] == ["product", "product"]
    assert model.conv1.in_channels == 1 and model.num_classes == 10

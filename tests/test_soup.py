"""scripts/soup.py: a greedy model soup of fine-tunes, chosen on validation, written as a shippable export."""
import json
from pathlib import Path

import pytest
import torch
from _helpers import load_script
from safetensors.torch import load_file, save_file
from test_training_utils import one_torch_thread, write_fashion_mnist  # noqa: F401  (fixture)

import bam_zoo

REPO = Path(__file__).resolve().parents[1]
soup = load_script(REPO / "scripts" / "soup.py", "soup")


def test_greedy_soup_adds_best_first_and_leaves_out_what_lowers_validation():
    """Score: closeness to 1.0. The 0.75 start is best; 1.5 joins (their mean 1.125 is closer); 5.0 would drag the
    mean to 2.42 and is left out; the result is the mean of what joined only."""
    ingredients = [{"state": {"w": torch.tensor([w]), "steps": torch.tensor(7)}} for w in (5.0, 1.5, 0.75)]
    state, best = soup.greedy_soup(ingredients, lambda s: -abs(float(s["w"]) - 1.0))
    assert [float(i["state"]["w"]) for i in ingredients] == [0.75, 1.5, 5.0]  # ranked by validation
    assert [i["joined"] for i in ingredients] == [True, True, False]
    assert float(state["w"]) == 1.125 and best == -0.125
    assert int(state["steps"]) == 7  # integer counters are not averaged


def fake_run(folder: Path, model: torch.nn.Module, seed: int, **recipe_model) -> Path:
    """A seed-study export: the weights plus the run record soup.py reads, and the lineage files beside it."""
    export = folder / f"seed{seed}" / "export"
    export.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors")
    (export / "metrics.json").write_text(json.dumps({
        "model_name": "resnet20", "model_args": {"num_classes": 10, "in_chans": 1}, "dataset": "fashion_mnist",
        "test": {"acc1": 0.5, "acc5": 0.9}, "epochs": 3, "train_wall_time_s": 100.0 + seed,
        "recipe": {"seed_everything": seed, "model": {"model_name": "resnet20", "pretrained": False, **recipe_model},
                   "data": {"init_args": {"val_size": 50, "split_seed": 0}}}}))
    (export.parent / "command.txt").write_text(f"python cli.py fit --seed_everything {seed}\n")
    (export.parent / "commit.txt").write_text("abc1234\n")
    return export


def test_soup_writes_the_average_it_chose_with_each_ingredients_lineage(tmp_path, capsys):
    root = write_fashion_mnist(tmp_path / "data", n_train=200, n_test=60)
    base = bam_zoo.create_model("resnet20", num_classes=10, in_chans=1)
    exports = []
    for seed in (1, 2):
        model = bam_zoo.create_model("resnet20", num_classes=10, in_chans=1)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * seed * torch.randn_like(p))
        exports.append(fake_run(tmp_path / "runs", model, seed))
    soup.main([*map(str, exports), "--out", str(tmp_path / "soup"), "--root", str(root)])
    record = json.loads((tmp_path / "soup" / "metrics.json").read_text())
    joined = [Path(i["export"]) for i in record["soup"] if i["joined"]]
    expected = soup.average([load_file(path / "model.safetensors") for path in joined])
    written = load_file(tmp_path / "soup" / "model.safetensors")
    assert written.keys() == expected.keys()
    for key in written:
        torch.testing.assert_close(written[key], expected[key])
    assert record["train_wall_time_s"] == sum(100.0 + int(p.parent.name[4:]) for p in joined)
    assert {i["commit"] for i in record["soup"]} == {"abc1234"} and len(record["soup"]) == 2
    assert all(i["command"].startswith("python cli.py fit --seed_everything") for i in record["soup"])
    assert 0 <= record["test"]["acc1"] <= 1 and record["num_params"] == bam_zoo.count_params(base)
    assert f"soup of {len(joined)}: validation top-1" in capsys.readouterr().out


@pytest.mark.parametrize("change, what", [({"model_name": "resnet20.fmnist"}, "start"),
                                          ({"val_size": 60}, "validation split")])
def test_a_soup_of_unrelated_runs_is_refused_and_nothing_is_written(tmp_path, change, what):
    model = bam_zoo.create_model("resnet20", num_classes=10, in_chans=1)
    first = fake_run(tmp_path, model, 1)
    other = fake_run(tmp_path, model, 2)
    run = json.loads((other / "metrics.json").read_text())
    if "val_size" in change:
        run["recipe"]["data"]["init_args"].update(change)
    else:
        run["recipe"]["model"].update(change)
    (other / "metrics.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match=f"differs from .* in its {what}"):
        soup.main([str(first), str(other), "--out", str(tmp_path / "soup")])
    assert not (tmp_path / "soup").exists()


def test_a_folder_that_is_not_an_export_is_named_with_what_it_lacks(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no metrics.json or model.safetensors"):
        soup.main([str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "soup")])

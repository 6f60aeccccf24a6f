"""Average fine-tunes of one start into one network: a greedy model soup (Wortsman et al., ICML 2022).

    python scripts/soup.py results/seed_study/resnet56.fmnist_long+bam_cycle2/seed{2,3}/export \\
        --out results/soups/resnet56.fmnist_long+bam_cycle2

Fine-tunes of the same weights with other seeds often end in one basin of the loss, where the average of their
parameters is a network as good as the best of them or better, at the cost of one: same size, same speed. The
ingredients are ranked by validation top-1 (the held-out training images their runs validated on, so never
trained on by any of them); the best starts the soup and each next one joins only if the soup's validation top-1
does not drop. The test set is measured once, on the finished soup, and only reported: it chooses nothing.

Each ingredient is a seed-study run's ``export`` folder (its ``metrics.json`` and ``model.safetensors``); all must
be the same network fine-tuned from the same weights on the same validation split, else nothing is written.
``--out`` gets an export folder in the same format, which ``scripts/ship_weights.py`` ships like a run's, and
``soup.json`` with each ingredient's validation top-1, whether it joined, its command and the commit it trained on.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import bam_zoo
from bam_zoo.evaluate import measure
from bam_zoo.training.data import FashionMNISTDataModule

# what every ingredient's run must share: the network, its start and the images that chose among them
SAME = {"network": lambda run: (run["model_name"], run["model_args"]),
        "start": lambda run: (run["recipe"]["model"].get("model_name"), run["recipe"]["model"].get("pretrained")),
        "validation split": lambda run: tuple(run["recipe"].get("data", {}).get("init_args", {}).get(k)
                                              for k in ("val_size", "split_seed"))}


def read_ingredient(export: Path) -> dict[str, Any]:
    """An ingredient's run record, weights and lineage (``command.txt``, ``commit.txt`` beside its export)."""
    missing = [n for n in ("metrics.json", "model.safetensors") if not (export / n).is_file()]
    if missing:
        raise SystemExit(f"{export} is not a run's export folder: it has no {' or '.join(missing)}. Pass the "
                         "export/ folder a seed-study run left under results/seed_study/<variant>/seed<S>/.")
    lineage = {n: (export.parent / f"{n}.txt").read_text().strip() if (export.parent / f"{n}.txt").is_file()
               else None for n in ("command", "commit", "machine")}
    return {"export": export, "run": json.loads((export / "metrics.json").read_text()),
            "state": load_file(export / "model.safetensors"), **lineage}


def check_compatible(ingredients: list[dict[str, Any]]) -> None:
    """Refuse a soup of networks that are not fine-tunes of one start, or were validated on other images."""
    first = ingredients[0]
    for other in ingredients[1:]:
        for what, key in SAME.items():
            if key(other["run"]) != key(first["run"]):
                raise SystemExit(f"{other['export']} differs from {first['export']} in its {what}: "
                                 f"{key(other['run'])} against {key(first['run'])}. A soup averages fine-tunes of "
                                 "one network from one start, chosen on one validation split.")
        shapes = {k: tuple(v.shape) for k, v in other["state"].items()}
        if shapes != {k: tuple(v.shape) for k, v in first["state"].items()}:
            raise SystemExit(f"{other['export']} and {first['export']} hold different tensors; nothing averaged.")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating tensor (weights and BatchNorm statistics); integer counters from the first."""
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


@torch.no_grad()
def validation_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 in percent on the validation images (``uint8``), normalised with the model's cfg."""
    cfg = model.pretrained_cfg
    mean, std = (torch.tensor(cfg[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    model.eval()
    correct = sum(int((model(((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last))
                       .argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / len(labels)


def greedy_soup(ingredients: list[dict[str, Any]], score) -> tuple[dict[str, torch.Tensor], float]:
    """Add ingredients best first while ``score(state)`` does not drop; marks each ``joined``, returns the soup."""
    for ingredient in ingredients:
        ingredient["val_top1"] = score(ingredient["state"])
    ingredients.sort(key=lambda i: -i["val_top1"])
    soup, best = [ingredients[0]], ingredients[0]["val_top1"]
    ingredients[0]["joined"] = True
    for ingredient in ingredients[1:]:
        candidate = score(average([i["state"] for i in (*soup, ingredient)]))
        ingredient["soup_val_top1_with_it"], ingredient["joined"] = candidate, candidate >= best
        if ingredient["joined"]:
            soup, best = [*soup, ingredient], candidate
    return average([i["state"] for i in soup]), best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", type=Path, nargs="+", help="the ingredients: run export folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the soup's export and soup.json")
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    args = parser.parse_args(argv)
    if len(args.exports) < 2:
        parser.error("a soup needs two or more exports")
    ingredients = [read_ingredient(path) for path in args.exports]
    check_compatible(ingredients)
    first = ingredients[0]["run"]
    model = bam_zoo.create_model(first["model_name"], **first["model_args"])
    val_size, split_seed = SAME["validation split"](first)
    data = FashionMNISTDataModule(root=args.root, val_size=val_size, split_seed=split_seed)
    data.setup("fit")
    images, labels = data.val_set.tensors
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": data.mean, "std": data.std, "label_names": data.classes}
    model.to(memory_format=torch.channels_last)

    def score(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=True)
        return validation_top1(model, images, labels)

    state, val_top1 = greedy_soup(ingredients, score)
    model.load_state_dict(state, strict=True)
    test = measure(model, root=args.root)
    joined = [i for i in ingredients if i["joined"]]
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, args.out / "model.safetensors")
    for name in ("config.json", "recipe.yaml"):  # the network's config and the recipe each ingredient ran
        if (ingredients[0]["export"] / name).is_file():
            shutil.copy(ingredients[0]["export"] / name, args.out / name)
    record = {
        **{k: first[k] for k in ("model_name", "model_args", "dataset", "recipe") if k in first},
        "test": {"acc1": test["top1"] / 100, "acc5": test["top5"] / 100},
        "per_class_acc1": {k: v / 100 for k, v in test["per_class"].items()}, "best_val_acc1": val_top1 / 100,
        "epochs": sum(i["run"]["epochs"] for i in joined),
        "train_wall_time_s": sum(i["run"]["train_wall_time_s"] for i in joined), "num_params": test["params"],
        "soup": [{"export": str(i["export"]), "seed": i["run"]["recipe"].get("seed_everything"),
                  "val_top1": i["val_top1"], "test_top1": 100 * i["run"]["test"]["acc1"], "joined": i["joined"],
                  **({"soup_val_top1_with_it": i["soup_val_top1_with_it"]} if "soup_val_top1_with_it" in i else {}),
                  "train_wall_time_s": i["run"]["train_wall_time_s"], "command": i["command"], "commit": i["commit"],
                  "machine": i["machine"]} for i in ingredients],
    }
    (args.out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "soup.json").write_text(json.dumps(record["soup"], indent=2) + "\n")
    for i in ingredients:
        state_of = "joined" if i["joined"] else "left out"
        print(f"{i['export']}: validation top-1 {i['val_top1']:.2f} ({state_of})")
    print(f"soup of {len(joined)}: validation top-1 {val_top1:.2f}, test top-1 {test['top1']:.2f} "
          f"(flip {test['top1_flip']:.2f}), {test['params']:,} parameters -> {args.out}")


if __name__ == "__main__":
    main()

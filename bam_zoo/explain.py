"""``cli.py explain``: pictures of what each BAM does to an image, from the attention it really applies.

Each BAM multiplies its features by ``1 + A``, ``A = sigmoid(Mc + Ms)``, shown averaged over channels (where the
stage looks) and over positions (which channels it boosts): the map the forward used, not a branch in isolation.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from bam_zoo import capture_attention, create_model
from bam_zoo.training.data import image_files, image_loader

__all__ = ["explain"]


def _figure(rows: int, cols: int, size: float):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)


@torch.no_grad()
def explain(model: str, images: str | list[str], out: str = "explain", pretrained: bool = True) -> str:
    """Write ``<image>.png`` per image (each BAM's attention over the input, its channel profile beside it)
    and ``overview.png`` (every image in a column: input, then each BAM's spatial attention, then the profiles).

    Args:
        model: a pretrained name (``bam_resnet20.fmnist``), or timm's ``local-dir:EXPORT_FOLDER`` /
            ``hf-hub:ORG/NAME`` for weights exported by ``cli.py fit``.
        images: an image file or folder, or a list (``'[a.png,b.png]'``); images are converted to the
            model's grey or RGB input.
        out: folder for the PNGs (created).
        pretrained: load the weights (``false`` shows an untrained network, for comparison).

    Returns:
        The output folder.
    """
    paths = image_files(images, "explain --images")
    net = create_model(model, pretrained=pretrained).eval()
    config = timm.data.resolve_data_config(model=net)
    transform = timm.data.create_transform(**config)
    mode, load = "L" if config["input_size"][0] == 1 else "RGB", image_loader(config["input_size"][0])
    inputs = torch.stack([transform(load(str(path))) for path in paths])
    # what the network saw (resized, cropped), back in [0, 1], so the maps line up with it exactly
    shown = inputs * torch.tensor(config["std"]).view(-1, 1, 1) + torch.tensor(config["mean"]).view(-1, 1, 1)
    pictures = [p[0] if mode == "L" else p.permute(1, 2, 0) for p in shown.clamp(0, 1)]
    with capture_attention(net) as maps:
        logits = net(inputs)
    labels = net.pretrained_cfg.get("label_names") or [str(i) for i in range(logits.shape[1])]
    predicted = [labels[i] for i in logits.argmax(1).tolist()]
    size = config["input_size"][1:]
    # where: N x H x W per BAM, upsampled to the input; profile: N x C per BAM
    where = {name: F.interpolate(a.mean(1, keepdim=True), size=size, mode="bilinear")[:, 0] for name, a in maps.items()}
    profile = {name: a.mean((2, 3)) for name, a in maps.items()}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def show(ax, i: int, name: str | None) -> None:
        ax.imshow(pictures[i], cmap="gray" if mode == "L" else None, vmin=0, vmax=1)
        if name is not None:  # attention in [0, 1] on a fixed colour scale, so images and stages compare
            ax.imshow(where[name][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])

    def bars(ax, i: int, name: str) -> None:
        ax.bar(range(profile[name].shape[1]), profile[name][i], width=1.0, color="tab:red")
        ax.set_ylim(0, 1), ax.set_xticks([]), ax.tick_params(labelsize=6)

    names = list(maps)
    for i, path in enumerate(paths):
        plt, fig, axes = _figure(len(names), 3, 2.0)
        for row, name in enumerate(names):
            show(axes[row, 0], i, None)
            show(axes[row, 1], i, name)
            fig.colorbar(axes[row, 1].images[-1], ax=axes[row, 1], fraction=0.046, pad=0.04)
            bars(axes[row, 2], i, name)
            axes[row, 1].set_title(f"{name}: where", fontsize=8)
            axes[row, 2].set_title(f"{name}: channels ({profile[name].shape[1]})", fontsize=8)
        axes[0, 0].set_title(f"{path.name}\npredicted: {predicted[i]}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{path.stem}.png", dpi=100)
        plt.close(fig)

    plt, fig, axes = _figure(1 + 2 * len(names), len(paths), 1.3)
    for i, path in enumerate(paths):
        show(axes[0, i], i, None)
        axes[0, i].set_title(f"{path.stem}\n→ {predicted[i]}", fontsize=6)
        for row, name in enumerate(names):
            show(axes[1 + row, i], i, name)
            bars(axes[1 + len(names) + row, i], i, name)
    for row, name in enumerate(names):
        axes[1 + row, 0].set_ylabel(f"{name}\nwhere", fontsize=6)
        axes[1 + len(names) + row, 0].set_ylabel(f"{name}\nchannels", fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "overview.png", dpi=120)
    plt.close(fig)
    return str(out_dir)

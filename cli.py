"""Entry point for ``python cli.py fit --config configs/fashion_mnist/bam_resnet20.yaml`` (same as ``bam-zoo``)."""

from bam_zoo.cli import main

if __name__ == "__main__":
    main()

"""Building blocks: the BAM attention module and its branches."""
from .bam import BAM, ChannelAttn, SingleSampleSafeBatchNorm1d, SingleSampleSafeBatchNorm2d, SpatialAttn
from .gate import bam_gate, bam_gate_reference

__all__ = [
    "BAM", "ChannelAttn", "SpatialAttn", "SingleSampleSafeBatchNorm1d", "SingleSampleSafeBatchNorm2d",
    "bam_gate", "bam_gate_reference",
]

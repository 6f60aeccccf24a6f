"""Building blocks: the BAM attention module (``bam.py``, the definition) and its CPU speed layer (``bam_cpu.py``)."""
from .bam import BAM, ChannelAttn, SingleSampleSafeBatchNorm1d, SingleSampleSafeBatchNorm2d, SpatialAttn
from .bam_cpu import disable_cpu_fast_path, native_kernels_available

__all__ = ["BAM", "ChannelAttn", "SpatialAttn", "SingleSampleSafeBatchNorm1d", "SingleSampleSafeBatchNorm2d",
           "disable_cpu_fast_path", "native_kernels_available"]

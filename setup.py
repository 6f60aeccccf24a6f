"""Builds the optional fused CPU kernels (``bam_zoo._native``); everything else is in pyproject.toml.

The kernels are compiled against the torch that is installed, so install with
``pip install --no-build-isolation -e .`` (torch first). Without torch at build time, or without a C++
compiler, the package installs without them and BAM runs its ATen fallback (same numbers, slower).
"""
from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # build isolation or no torch: pure-Python install
    pass
else:
    ext_modules = [CppExtension(
        "bam_zoo._native", ["bam_zoo/csrc/bam_gate.cpp"],
        # -fopenmp for at::parallel_for; not linked, so the GOMP symbols bind to torch's own libgomp
        extra_compile_args=["-O3", "-fopenmp"],
        optional=True,  # a failed build (no compiler) installs the package without the kernels
    )]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

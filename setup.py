"""Build the stackformer C extension: the C core (csrc/) plus the thin binding, one module.

Environment knobs:
  STACKFORMER_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
  STACKFORMER_NO_OPENMP=1  build without OpenMP (single-threaded)
"""
import glob
import os
import sys

import numpy as np
from setuptools import Extension, setup

# every C file of the core, found rather than listed (csrc/Makefile globs the same way)
HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = sorted(os.path.relpath(p, os.path.join(HERE, "csrc"))
              for p in glob.glob(os.path.join(HERE, "csrc", "*.c")) + glob.glob(os.path.join(HERE, "csrc", "wiring", "*.c")))

# -fno-trapping-math: lets the compiler turn the branch-free selects of the hot loops into
# vector blends (the library never inspects floating-point exception flags); -fno-math-errno:
# sqrtf is then an instruction, and loops that call it (AdamW's update) vectorize (the library
# never reads errno; vsqrtps rounds exactly like sqrtss)
compile_args = ["-std=c11", "-O3", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unused-parameter"]


def _cpu_has(*flags):
    """True when this (the build) machine's CPU reports every flag. The package compiles from
    source where it runs; STACKFORMER_PORTABLE=1 builds a baseline binary instead (the matmul
    kernel still picks AVX2/FMA at run time)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(fl in have for fl in flags)
    except OSError:
        pass
    return False


if os.environ.get("STACKFORMER_PORTABLE") != "1" and _cpu_has("avx2", "fma"):
    compile_args += ["-mavx2", "-mfma"]
link_args = []
if os.environ.get("STACKFORMER_NO_OPENMP") != "1" and sys.platform != "darwin":
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("STACKFORMER_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args = [a for a in compile_args if a != "-O3"] + ["-O1"] + san
    link_args += san

ext = Extension(
    "stackformer._core",
    sources=["python/stackformer/_core.c"] + [os.path.join("csrc", f) for f in CSRC],
    include_dirs=["csrc", np.get_include()],
    depends=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")) + glob.glob(os.path.join(HERE, "csrc", "wiring", "*.h"))),
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=["m"],
)

setup(ext_modules=[ext])

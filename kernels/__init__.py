"""Triton kernels of transfuse, loaded by the `triton` backend (transfuse.kernels.*)."""
import importlib.metadata

# Imported as top-level `kernels`, this folder is shadowing Hugging Face's `kernels` package
# (which transformers >= 5.25 imports): the repository root is on sys.path, as with
# `python -m pytest` or `python -c` run there. Say so rather than fail later on a missing name.
if __name__ == "kernels":
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        raise ImportError(
            "transfuse's kernels/ folder shadows the installed `kernels` package: the repository "
            "root is on sys.path. Run `pytest` (not `python -m pytest`) or set PYTHONSAFEPATH=1.")

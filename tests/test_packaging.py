"""The package layout: kernels/ ships as llm2vec_fast.kernels (never a top-level `kernels`, which is
Hugging Face's import name), both from a built wheel and from a source checkout on PYTHONPATH."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_kernels_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = tmp_path.glob("llm2vec_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm2vec_fast/kernels/flash_attention.py" in names
    assert "llm2vec_fast/kernels/__init__.py" in names
    assert "llm2vec_fast/reference/attention.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert "kernels" not in top_level, f"a top-level 'kernels' package would shadow Hugging Face's: {top_level}"


def test_source_checkout_on_pythonpath_exposes_llm2vec_fast_kernels():
    """python -S skips site-packages' .pth files, so no editable-install finder can map the folder."""
    site = sysconfig.get_paths()["purelib"]
    code = ("import torch, llm2vec_fast as lf, llm2vec_fast.kernels.pooling as p; print(p.__file__); "
            "print(lf.dispatch.available_backends('pool', torch.device('cpu')))")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{site}", TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, cwd=REPO.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    path, backends = result.stdout.strip().splitlines()[-2:]
    assert Path(path).resolve() == REPO / "kernels" / "pooling.py"
    assert "triton" in backends


@pytest.mark.parametrize("hub_kernels", ["installed", "absent"])
def test_import_kernels_from_the_checkout_root_is_never_our_folder(tmp_path, hub_kernels):
    """``python -m`` from the repository root puts the root first on sys.path, where ``kernels/`` would shadow
    Hugging Face's ``kernels`` (transformers >= 5.25 imports it: "cannot import name 'CUDAProperties'"). The
    folder hands the name over: ``import kernels`` gives the hub package, or ModuleNotFoundError without one;
    ``llm2vec_fast.kernels`` is unaffected either way."""
    fake = tmp_path / "kernels"  # a stand-in for the hub package, whatever this venv has
    fake.mkdir()
    (fake / "__init__.py").write_text("CUDAProperties = 'the hub package'\n")
    lookup = [str(REPO)] + ([str(tmp_path)] if hub_kernels == "installed" else [])  # the checkout first
    code = ("import sys\n"
            "import llm2vec_fast.kernels.gated\n"
            f"sys.path[:] = {lookup!r}\n"
            "try:\n    import kernels; print(getattr(kernels, 'CUDAProperties', kernels.__file__))\n"
            "except ModuleNotFoundError as error:\n    print('ModuleNotFoundError', error.name)\n"
            "import llm2vec_fast.kernels.rms_norm as r; print(r.__name__, 'kernels' in sys.modules)")
    site = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{site}", TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.strip().splitlines()[-2:]
    if hub_kernels == "installed":
        assert (first, second) == ("the hub package", "llm2vec_fast.kernels.rms_norm True")
    else:
        assert (first, second) == ("ModuleNotFoundError kernels", "llm2vec_fast.kernels.rms_norm False")

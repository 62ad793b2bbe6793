import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    """Every kernel variant goes through Triton's real compiler (PTX and ptxas) for Hopper, without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes of sm_90 code") == 69


@pytest.mark.slow
def test_the_kernels_package_stands_alone():
    """kernels/ is the bottom layer: importing it (every kernel module) loads no other part of fastcoop and no
    open_clip; callers pass what they choose."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib\nimport fastcoop.kernels as k\n"
            "for m in pkgutil.iter_modules(k.__path__):\n    importlib.import_module('fastcoop.kernels.' + m.name)\n"
            "print(sorted(n for n in sys.modules if (n.startswith('fastcoop') and not n.startswith('fastcoop.kernels')"
            " and n != 'fastcoop') or n.split('.')[0] == 'open_clip'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr

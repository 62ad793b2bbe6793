"""Break each Triton kernel on purpose, one small change at a time, and check that its quick tests fail.

A kernel test whose quick case has an answer of zero anyway (one class: no loss, no gradient) passes a wrong
kernel; this script is how such a case is found. Each change below is a plausible slip (a constant, a missing
term, an off-by-one mask, a wrong divisor); for each, the kernel's tests run with `-m "not slow"` and must fail.
Run it from the repository root: `python tests/break_kernels.py` (about a minute on a CPU, interpreted); it
restores every file it changes and exits non-zero when a break goes unnoticed.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BREAKS = [  # (file, what it says, the slip, the tests that must catch it)
    ("kernels/cosine_ce_kernel.py", "+ tl.sum(tl.exp(logits - new_max[:, None]), 1)",
     "+ tl.sum(tl.exp(logits - new_max[:, None]), 1) * 1.001", "tests/test_cosine_ce.py"),
    ("kernels/cosine_ce_kernel.py", "== y[:, None], 1.0, 0.0))", "== y[:, None], 0.99, 0.0))",
     "tests/test_cosine_ce.py"),
    ("kernels/triton_common.py", "return h * tl.sigmoid(1.702 * h)", "return h * tl.sigmoid(1.7 * h)",
     "tests/test_quick_gelu.py"),
    ("kernels/triton_common.py", "return s + 1.702 * h * s * (1.0 - s)", "return s + 1.702 * h * s",
     "tests/test_quick_gelu.py"),
    ("kernels/triton_common.py", "h * tl.exp(-0.5 * h * h) * 0.3989422804014327",
     "h * tl.exp(-0.5 * h * h) * 0.398", "tests/test_mlp.py"),
    ("kernels/add_layer_norm_kernel.py", "tl.sum(centered * centered, 1) / D + eps",
     "tl.sum(centered * centered, 1) / (D - 1) + eps", "tests/test_add_layer_norm.py"),
    ("kernels/prefix_attention_kernel.py", "j[None, :] < visible, s_pre", "j[None, :] < visible - 1, s_pre",
     "tests/test_prefix_attention.py"),
    ("kernels/prefix_attention_kernel.py", "tl.store(DKP_PART + part, dkp * sm_scale,",
     "tl.store(DKP_PART + part, dkp * sm_scale * 1.01,", "tests/test_prefix_attention.py"),
]


def main() -> int:
    missed = 0
    for file, text, slip, tests in BREAKS:
        path = ROOT / file
        source = path.read_text()
        if source.count(text) != 1:
            print(f"STALE  {file}: '{text}' is not in it once; update this list")
            missed += 1
            continue
        path.write_text(source.replace(text, slip))
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                                   tests], cwd=ROOT, capture_output=True, text=True)
        finally:
            path.write_text(source)
        caught = done.returncode != 0
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'} {file}: {slip!r} ({done.stdout.strip().splitlines()[-1]})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

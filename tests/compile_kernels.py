"""Compile every Triton kernel ahead of time for an H100/H200 (sm_90), fp32 and bf16, without a GPU.

The interpreter runs kernels as NumPy code; this catches what only the real compiler sees (types, layouts, tile
shapes). Run with TRITON_INTERPRET=0 (test_kernels_compile.py does); prints one line per compiled variant, with
its registers and spills per thread (what decides how many programs fit on a multiprocessor).
"""

import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcoop.kernels import add_layer_norm_kernel as add_layer_norm
from fastcoop.kernels import cosine_ce_kernel as cosine_ce
from fastcoop.kernels import mlp_kernel as mlp
from fastcoop.kernels import prefix_attention_kernel as attention
from fastcoop.kernels import quick_gelu_kernel as quick_gelu


# integer arguments that are multiples of 16 in the benchmarked shapes (D = 512, head size 64): at run time Triton
# specialises on that (and on 16-byte aligned pointers) and vectorises the loads, so the report must too; sizes
# that follow the data (rows, classes, splits) are never specialised (triton_common.py)
MULTIPLES_OF_16 = {"D", "stride_x", "stride_w", "stride_xr", "stride_wr", "stride_t", "stride_part", "stride_h", "DH",
                   "HIDDEN", "WIDTH"}


def compile_for_hopper(fn, types: dict, constexprs: dict, num_warps: int = 4) -> str:
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    aligned = [i for i, n in enumerate(names) if n not in constexprs and (types[n].startswith("*") or
                                                                         n in MULTIPLES_OF_16)]
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], fn.__name__
    return (f"{fn.__name__} {constexprs} {num_warps} warps: {len(compiled.asm['cubin'])} bytes of sm_90 code"
            f"{resources(compiled.asm['ptx'])}")


def resources(ptx: str) -> str:
    """Registers and spills per thread, from the ptxas that Triton bundles (what limits programs per SM)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        done = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(Path(tmp) / "k.ptx"), "-o", os.devnull],
                              capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return f", {registers.group(1)} registers, {spills.group(1)} bytes spilled" if registers and spills else ""


def main():
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        p = f"*{dtype}"
        ce = dict(X=p, W=p, Y="*i64", PLAN="*i32", SCALE="*fp32", LSE="*fp32", G_ROW="*fp32", G_RUN="*fp32",
                  B="i32", K="i32", D="i32", stride_xr="i32", stride_x="i32", stride_wr="i32", stride_w="i32",
                  LSE_PART="*fp32", TARGET_PART="*fp32", BEST_PART="*fp32", INDEX_PART="*i64", LOSS="*fp32",
                  ARGMAX="*i64", RUN_LOSS="*fp32", HITS="*i64", SPLITS="i32", DX_PART=p, DSCALE_PART="*fp32",
                  DW_PART=p)
        # fp32 runs the small tiles only (cosine_ce_kernel.tiles_for): the large ones spill without tensor cores
        for tiles in (cosine_ce.SMALL, cosine_ce.LARGE) if dtype == "bf16" else (cosine_ce.SMALL,):
            blocks = dict(BLOCK_B=tiles.rows, BLOCK_K=tiles.classes, BLOCK_D=tiles.features, PRECISION=precision,
                          UPCAST=False)
            print(compile_for_hopper(cosine_ce._cosine_ce_forward, ce, blocks, tiles.forward_warps))
            for fn in (cosine_ce._cosine_ce_grad_x, cosine_ce._cosine_ce_grad_w):  # as training: the runs' means
                print(compile_for_hopper(fn, ce, dict(blocks, BLOCK_DC=tiles.chunk, ROW_GRAD=False, RUN_GRAD=True),
                                         tiles.backward_warps))
        for one_block in (True, False):  # a training batch's rows; evaluation's many
            print(compile_for_hopper(cosine_ce._cosine_ce_forward_combine, ce,
                                     dict(BLOCK=cosine_ce.BLOCK_COMBINE, ONE_BLOCK=one_block)))
        att = dict(QKV=p, O=p, DO=p, DQKV=p, LSE="*fp32", DKP_PART="*fp32", DVP_PART="*fp32", STARTS="*i64",
                   LENGTHS="*i64", FIRST_ROW="*i64", FIRST="i32", END="i32", GROUP="i32", P="i32", H="i32",
                   HEADS="i32", sm_scale="fp32", stride_run="i32", stride_t="i32", stride_part="i32",
                   stride_h="i32", stride_o_run="i32", DH="i32")
        # 64 rows: classes packed four to a tile (PackedLayout's pack_rows)
        for has_prefix, block_s in ((True, 64), (True, 32), (True, 16), (False, 32), (False, 16)):
            tiles = dict(HAS_PREFIX=has_prefix, PACKED=block_s > 32, BLOCK_S=block_s, BLOCK_P=32, BLOCK_DH=64,
                         PRECISION=precision, UPCAST=False)
            for fn in (attention._attention_forward, attention._attention_backward):
                print(compile_for_hopper(fn, att, tiles))
                if has_prefix and block_s == 16:  # the classes' launch with the prefix apart, at num_warps=2 too
                    print(compile_for_hopper(fn, att, tiles, num_warps=2))
                if block_s == 64:  # tall packed tiles may want 8 warps
                    print(compile_for_hopper(fn, att, tiles, num_warps=8))
        partials = dict(PARTS="*fp32", DQKV=p, GROUPS="i32", PHD="i32", H="i32", HEADS="i32", DH="i32",
                        stride_run="i32", stride_t="i32", stride_part="i32", stride_h="i32")
        print(compile_for_hopper(attention._add_prefix_partials, partials,
                                 dict(BLOCK_G=16, BLOCK=attention.BLOCK_PARTIALS)))
        # as in the text encoder under autocast: fp32 residual stream, the branch and the normed output in dtype
        norm = dict(X="*fp32", DELTA=p, W="*fp32", B="*fp32", H="*fp32", Y=p, MEAN="*fp32", RSTD="*fp32", DY=p,
                    DH_LATER="*fp32", DX="*fp32", DDELTA=p, N="i32", D="i32", eps="fp32")
        tiles, _ = add_layer_norm._launch(512, 4096)
        tiles.pop("num_warps")
        for has_delta in (True, False):  # without delta: the first block's norm, after the embedding
            print(compile_for_hopper(add_layer_norm._add_layer_norm_forward, norm, dict(tiles, HAS_DELTA=has_delta)))
            print(compile_for_hopper(add_layer_norm._add_layer_norm_backward, norm,
                                     dict(tiles, HAS_DELTA=has_delta, HAS_DH_LATER=True)))
        # the MLP's products with the activation inside: every tile size for bf16, GELU and QuickGELU; fp32 once
        fused_mlp = dict(Y=p, W=p, BIAS=p, H=p, G=p, DOUT=p, DH=p, M="i32", HIDDEN="i32", WIDTH="i32")
        tile_sizes = ((128, 128, 8), (64, 128, 4), (64, 64, 4)) if dtype == "bf16" else ((64, 64, 4),)
        for (block_m, block_n, warps), quick in itertools.product(tile_sizes, (False, True)):
            tiles = dict(QUICK=quick, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, PRECISION=precision, UPCAST=False)
            if dtype == "bf16" or not quick:
                print(compile_for_hopper(mlp._linear_activation_forward, fused_mlp, dict(tiles, HAS_BIAS=True), warps))
                print(compile_for_hopper(mlp._activation_input_grad, fused_mlp, tiles, warps))
        act = dict(X=p, Y=p, DY=p, DX=p, N="i32")
        for fn in (quick_gelu._quick_gelu_forward, quick_gelu._quick_gelu_backward):
            print(compile_for_hopper(fn, act, dict(BLOCK=quick_gelu.BLOCK)))


if __name__ == "__main__":
    main()

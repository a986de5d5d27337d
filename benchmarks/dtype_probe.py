"""Matmul speed per dtype on this machine's CPU, and the dtype abfleet's resolver picks here.

    python benchmarks/dtype_probe.py            # the probe's shape and a decoder's larger one
    ABFLEET_CPU_BF16=slow python benchmarks/dtype_probe.py   # with the verdict forced

Each figure is the sustained GFLOP/s of one matmul shape after a warm-up (abfleet.precision's
own probe runs the first shape, float32 against bfloat16, once per machine). A GPU, when there
is one, is reported with the dtype its compute capability gets.
"""

from __future__ import annotations

import os
import time

import torch

from abfleet import precision

SHAPES = [precision.PROBE_SHAPE, (1024, 576, 1536), (32, 2048, 8192)]
DTYPES = ("float32", "bfloat16", "float16")


def main() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, mkldnn bf16 "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    print(f"{'shape (m x k @ k x n)':<24}" + "".join(f"{d:>12}" for d in DTYPES) + "   GFLOP/s")
    for shape in SHAPES:
        row = [precision.matmul_gflops(d, shape) for d in DTYPES]
        label = f"{shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}"
        print(f"{label:<24}" + "".join(f"{g:>12.1f}" for g in row))
    started = time.perf_counter()
    verdict = precision.cpu_verdict(refresh=not os.environ.get(precision.FORCE_ENV))
    took = time.perf_counter() - started
    chosen = precision.for_cpu(verdict)
    print(f"resolver's probe ({verdict.source}, {took:.2f} s): native bf16 = {verdict.native}")
    print(f"auto on this CPU: {chosen.dtype} ({chosen.reason})")
    if torch.cuda.is_available():
        gpu = precision.resolve()
        print(f"auto on {torch.cuda.get_device_name(0)}: {gpu.dtype} ({gpu.reason})")


if __name__ == "__main__":
    main()

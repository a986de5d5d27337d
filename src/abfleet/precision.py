"""The compute dtype for the device a model runs on: the one it computes fast and correctly.

A job's dtype `auto` (the default), the demo build and the judge all come here. The rules:
- CPU: bfloat16 only where this CPU computes it natively (AVX512-BF16/AMX); elsewhere torch
  falls back to a scalar loop about 50x slower than float32, so float32. Whether it is native
  is measured once per machine by a short matmul probe (float32 against bfloat16) and kept in
  the cache folder, keyed by the CPU and the torch version.
- CUDA: bfloat16 from compute capability 8.0 (Ampere on); float16 on 7.x (V100, T4, RTX 20xx:
  no bf16), with float32 tried next when float16's logits overflow; float32 below 7.0.

The rules themselves need no torch (`size` and `offers` plan with them on the controller);
reading the device's facts does.

ABFLEET_CPU_BF16=native|slow forces the probe's verdict (tests, benchmarks, a user who knows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from abfleet.errors import UserError
from abfleet.paths import cache_dir

log = logging.getLogger(__name__)

FORCE_ENV = "ABFLEET_CPU_BF16"
# bfloat16 is chosen on a CPU only where its matmuls run at least this fraction of float32's
# speed: below it, bf16 saves memory a CPU rarely lacks and costs time (and precision).
CPU_BF16_MIN_SPEED = 0.8
# The probe's matmul: a decoder projection's shape at a small model's width (rows x in @ in x out).
PROBE_SHAPE = (256, 576, 1536)
PROBE_SECONDS = 0.15  # per dtype, after one warm-up call


@dataclass(frozen=True)
class Precision:
    """What `auto` means on a device: a dtype, why, and what to try if it fails its smoke test."""

    dtype: str  # a torch dtype name: bfloat16, float16 or float32
    reason: str  # one line, for the run's header, `status` and abfleet-run.json
    fallbacks: tuple[str, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        return (self.dtype, *self.fallbacks)


@dataclass(frozen=True)
class CpuVerdict:
    native: bool  # bfloat16 computes at float32's speed or better here
    float32_gflops: float | None
    bfloat16_gflops: float | None
    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    source: str  # "probe", "cached probe" or "forced by ABFLEET_CPU_BF16"

    @property
    def speed_ratio(self) -> float | None:
        """bfloat16's matmul speed over float32's (None when not measured)."""
        if not self.float32_gflops or self.bfloat16_gflops is None:
            return None
        return self.bfloat16_gflops / self.float32_gflops


def for_cpu(verdict: CpuVerdict) -> Precision:
    ratio = verdict.speed_ratio
    if verdict.source.startswith("forced") or ratio is None:
        forced = f"{FORCE_ENV}={'native' if verdict.native else 'slow'}"
        where = f"this CPU ({verdict.capability}, {forced})"
        if verdict.native:
            return Precision("bfloat16", f"bf16 is native on {where}", ("float32",))
        return Precision("float32", f"bf16 is not native on {where}")
    where = f"this CPU ({verdict.capability})"
    if verdict.native:
        why = f"bf16 is native on {where}: {ratio:.1f}x float32's matmul speed"
        return Precision("bfloat16", why, ("float32",))
    slower = 1 / ratio
    times = f"{slower:.0f}x" if slower >= 10 else f"{slower:.1f}x"
    return Precision("float32", f"bf16 is {times} slower than float32 on {where}")


def for_cuda(capability: tuple[int, int], name: str = "this GPU") -> Precision:
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if capability >= (8, 0):
        return Precision("bfloat16", f"bf16 is native on {name} ({cc})", ("float32",))
    if capability >= (7, 0):
        return Precision(
            "float16",
            f"{name} ({cc}) has no bf16: float16, and float32 if its logits overflow",
            ("float32",),
        )
    return Precision("float32", f"{name} ({cc}) has no fast half precision")


def resolve(device: str | None = None) -> Precision:
    """`auto` on this process's device: the first CUDA device unless device is "cpu"."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        # A model spread over several GPUs runs at the pace (and dtype) of the weakest.
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        weakest = min(range(len(caps)), key=lambda i: caps[i])
        return for_cuda(caps[weakest], torch.cuda.get_device_name(weakest))
    return for_cpu(cpu_verdict())


def plan(dtypes: tuple[str, ...] | list[str], device: str | None = None) -> list[tuple[str, str]]:
    """The dtypes a load tries, in order, each with why: `auto` becomes this device's choice
    (then its fallbacks); a dtype the user listed is kept as given."""
    out: list[tuple[str, str]] = []
    for name in dtypes:
        if name == "auto":
            precision = resolve(device)
            entries = [(d, precision.reason) for d in precision.chain]
        else:
            entries = [(name, "as the job's dtype list asks")]
        for dtype, why in entries:
            if all(dtype != seen for seen, _ in out):
                out.append((dtype, why))
    return out


def cpu_verdict(refresh: bool = False) -> CpuVerdict:
    """Whether bfloat16 is native on this CPU: forced, cached, or probed (and then cached)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced:
        if forced not in ("native", "slow"):
            raise UserError(f"{FORCE_ENV}={forced!r}: use native or slow (or unset it)")
        return CpuVerdict(forced == "native", None, None, capability, f"forced by {FORCE_ENV}")
    path = _cache_file()
    key = _machine_key(capability, torch.__version__)
    if not refresh:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            found = json.loads(path.read_text())[key]
            return CpuVerdict(**{**found, "source": "cached probe"})
    f32 = matmul_gflops("float32")
    bf16 = matmul_gflops("bfloat16")
    verdict = CpuVerdict(bf16 >= CPU_BF16_MIN_SPEED * f32, f32, bf16, capability, "probe")
    log.info("CPU bf16 probe: float32 %.1f GFLOP/s, bfloat16 %.1f GFLOP/s", f32, bf16)
    _store(path, key, verdict)
    return verdict


def matmul_gflops(dtype: str, shape: tuple[int, int, int] = PROBE_SHAPE) -> float:
    """Sustained CPU matmul speed at this dtype, in GFLOP/s."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(k, n, generator=gen).to(getattr(torch, dtype))
    with torch.inference_mode():
        a @ b  # warm-up: kernel selection, caches
        reps, started = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            elapsed = time.perf_counter() - started
            if elapsed >= PROBE_SECONDS:
                break
    return 2 * m * k * n * reps / elapsed / 1e9


def _cache_file() -> Path:
    return cache_dir() / "cpu-bf16.json"


def _machine_key(capability: str, torch_version: str) -> str:
    """The CPU (model and instruction set flags) and torch: what the verdict depends on."""
    model, flags = platform.processor(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not model.strip():
                model = value.strip()
            elif field.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    digest = hashlib.sha256(f"{model}|{flags}|{capability}|{torch_version}".encode())
    return digest.hexdigest()[:16]


def _store(path: Path, key: str, verdict: CpuVerdict) -> None:
    """Add the verdict to the cache file (temp file, then rename: never half written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        entry = {k: v for k, v in asdict(verdict).items() if k != "source"}
        known[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        tmp.replace(path)
    except OSError as exc:  # a read-only cache only costs the probe next time
        log.warning("could not cache the CPU bf16 verdict in %s: %s", path, exc)

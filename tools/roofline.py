"""A roofline for the replay kernel derived from its machine code: compile it for sm_90 (no GPU needed,
Triton ships ptxas and cuobjdump), count the SASS instructions of one iteration of its step loop, and
turn the counts into ceilings in element-steps/s for an H100. With --training, the same for training's
passes: SASS instructions per element of the whole grouped kernel for PERTURB, RESTORE_UPDATE and the
fused UPDATE_PERTURB (P3 of step t with P1 of t+1), beside the HBM bound of one pass.

    python tools/roofline.py [--sms 132] [--clock-ghz 1.98] [--dtype BF16] [--integer-bf16] [--training]

bfloat16 is compiled as the kernels launch it on sm_80+ (the hardware conversion) unless --integer-bf16.

Per SM and clock, from NVIDIA's throughput table for compute capability 9.0: 4 warp instructions
issued (128 thread instructions); 128 FP32 add/mul/FMA; 64 for 32-bit integer multiply (IMAD*) and for
integer add/logic/shift (IADD3, LOP3, SHF, ...); 16 conversions (F2F). The Gaussian table lookup is a
2-byte gather from a 128 KiB table: a warp's 32 lanes touch ~32 different 32-byte sectors, and L1
returns 4 sectors (128 bytes) per clock, so one lookup per element costs ~1/4 clock per element per SM.
The ceiling is the lowest of these bounds; benchmarks print their ratio to it.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

DTYPE_NAMES = ("F32", "BF16", "F16")
PIPES = {  # thread instructions per SM per clock, compute capability 9.0
    "issue": 128, "fp32": 128, "int": 64, "imad": 64, "conversion": 16,
}
SECTORS_PER_CLOCK = 4  # L1: 128 bytes per clock per SM
GATHER_SECTORS_PER_WARP = 4096 * (1 - (1 - 1 / 4096) ** 32)  # distinct sectors: 32 lanes into 4096


def _pipe(op: str) -> str | None:
    if op in ("FADD", "FMUL", "FFMA", "FSEL", "FSETP", "FMNMX"):
        return "fp32"
    if op.startswith("IMAD"):
        return "imad"
    if op in ("F2F", "F2FP", "F2I", "I2F"):
        return "conversion"
    if op in ("IADD3", "LOP3", "SHF", "SGXT", "LEA", "ISETP", "SEL", "PRMT", "VIADD", "IABS", "BMSK", "MOV"):
        return "int"
    return None


def _sass(dtype: str, mode: int | None, noise: str, **options) -> tuple[list[tuple[int, str]], str]:
    """(address, opcode) of every SASS instruction of one kernel variant compiled for sm_90, and the listing."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    from mezo_replay.kernels import triton_kernels as T

    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    k = T.compile_for_gpu(dt, T.REPLAY if mode is None else mode, noise=noise, **options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*)[^;]*;", sass)]
    return code, sass


def _backward_branches(code: list[tuple[int, str]], sass: str) -> list[tuple[int, int]]:
    """(target, branch address) of each branch to an earlier address: loops."""
    out = []
    for addr, op in code:
        if op.split()[-1].startswith("BRA"):
            m = re.search(r"BRA\s+0x([0-9a-f]+)", re.search(r"/\*%04x\*/[^;]*;" % addr, sass).group(0))
            if m and int(m.group(1), 16) < addr:
                out.append((int(m.group(1), 16), addr))
    return out


def _opcode(op: str) -> str:
    return op.split()[-1].split(".")[0]


def loop_counts(dtype: str = "BF16", noise: str = "gaussian16", *, native_bf16: bool | None = None,
                block: int = 1024, num_warps: int = 4) -> tuple[collections.Counter, int]:
    """Opcode counts of one step-loop iteration of the REPLAY kernel, and elements per thread."""
    code, sass = _sass(dtype, None, noise, native_bf16=native_bf16, block=block, num_warps=num_warps)
    loops = _backward_branches(code, sass)
    if not loops:
        raise RuntimeError("no backward branch: the step loop was not found")
    start, end = loops[0]
    counts = collections.Counter(_opcode(op) for addr, op in code if start <= addr <= end)
    return counts, block // (32 * num_warps)


def pass_counts(dtype: str, mode: int, noise: str = "gaussian16", *, group: bool = True, decay: bool = True,
                device_scalars: bool = True, native_bf16: bool | None = None, block: int = 1024,
                num_warps: int = 4) -> tuple[collections.Counter, int]:
    """Opcode counts of a whole one-step kernel (training's PERTURB, RESTORE_UPDATE or UPDATE_PERTURB; by
    default the grouped launch with c and go read from device memory, as a step without host syncs runs
    it), and elements per thread. Straight-line code: every instruction runs once per thread, except the
    exit's self-branch, so the static count is the dynamic one."""
    from mezo_replay.kernels import triton_kernels as T

    scalars = device_scalars and mode != T.PERTURB
    code, sass = _sass(dtype, mode, noise, group=group, decay=decay and mode != T.PERTURB, native_bf16=native_bf16,
                       block=block, num_warps=num_warps, c_on_device=scalars,
                       go_on_device=scalars and mode == T.UPDATE_PERTURB)
    loops = [(a, b) for a, b in _backward_branches(code, sass) if a != b]  # the exit's `BRA self` is no loop
    if loops:
        raise RuntimeError(f"a loop in the one-step kernel at {loops}: a static count would undercount it")
    counts = collections.Counter(_opcode(op) for addr, op in code if _opcode(op) not in ("NOP",))
    return counts, block // (32 * num_warps)


def ceilings(counts: collections.Counter, per_thread: int, sms: int, clock_hz: float,
             gathers_per_element: float) -> dict[str, float]:
    """Element-steps/s allowed by each bound."""
    per_elem = {pipe: 0.0 for pipe in PIPES}
    for op, n in counts.items():
        per_elem["issue"] += n / per_thread
        if (pipe := _pipe(op)) is not None:
            per_elem[pipe] += n / per_thread
    out = {pipe: sms * clock_hz * PIPES[pipe] / v for pipe, v in per_elem.items() if v}
    if gathers_per_element:
        clocks_per_elem = gathers_per_element * GATHER_SECTORS_PER_WARP / SECTORS_PER_CLOCK / 32
        out["L1 table gather"] = sms * clock_hz / clocks_per_elem
    return out


def roofline(dtype: str = "BF16", noise: str = "gaussian16", *, sms: int = 132, clock_ghz: float = 1.98,
             native_bf16: bool | None = None) -> tuple[float, dict[str, float], float]:
    """(ceiling, every bound, instructions per element-step)."""
    counts, per_thread = loop_counts(dtype, noise, native_bf16=native_bf16)
    bounds = ceilings(counts, per_thread, sms, clock_ghz * 1e9, 1.0 if noise == "gaussian16" else 0.0)
    return min(bounds.values()), bounds, sum(counts.values()) / per_thread


def training_passes(dtype: str, noise: str, *, sms: int = 132, clock_ghz: float = 1.98, hbm_tbps: float = 3.35,
                    native_bf16: bool | None = None) -> dict[str, tuple[float, float]]:
    """Per pass kind: (SASS instructions per element, the lowest of the pipe, table-gather and HBM bounds in
    elements/s). "P3+P1 apart" is RESTORE_UPDATE then PERTURB, what the fused pass replaces: two HBM round
    trips."""
    from mezo_replay.kernels import triton_kernels as T

    size = {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    out = {}
    for name, mode in (("PERTURB", T.PERTURB), ("RESTORE_UPDATE", T.RESTORE_UPDATE),
                       ("UPDATE_PERTURB", T.UPDATE_PERTURB)):
        counts, per_thread = pass_counts(dtype, mode, noise, native_bf16=native_bf16)
        lookups = (2.0 if mode == T.UPDATE_PERTURB else 1.0) if noise == "gaussian16" else 0.0
        bounds = ceilings(counts, per_thread, sms, clock_ghz * 1e9, lookups)
        hbm = hbm_tbps * 1e12 / (2 * size)  # one read and one write of each element
        out[name] = (sum(counts.values()) / per_thread, min(min(bounds.values()), hbm))
    p, r = out["PERTURB"], out["RESTORE_UPDATE"]
    out["P3+P1 apart"] = (p[0] + r[0], 1 / (1 / p[1] + 1 / r[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-ghz", type=float, default=1.98)
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="for --training: HBM bandwidth (H100 SXM: 3.35)")
    ap.add_argument("--dtype", default=None, choices=DTYPE_NAMES)
    ap.add_argument("--integer-bf16", action="store_true", help="bfloat16 by the integer rounding (before sm_80)")
    ap.add_argument("--native-bf16", action="store_true", help=argparse.SUPPRESS)  # the default since issue 11
    ap.add_argument("--training", action="store_true", help="also the training passes, fused and apart")
    args = ap.parse_args()
    native = False if args.integer_bf16 else None
    print(f"replay kernel, sm_90 SASS, {args.sms} SMs at {args.clock_ghz} GHz; element-steps/s per bound")
    print(f"{'dtype':<6}{'noise':<14}{'instr/elt-step':>15}{'issue':>10}{'int':>10}{'imad':>10}{'fp32':>10}"
          f"{'conv':>10}{'L1 gather':>11}{'ceiling':>10}")
    dtypes = [args.dtype] if args.dtype else DTYPE_NAMES
    for dtype in dtypes:
        for noise in ("gaussian16", "rademacher16"):
            ceiling, b, per = roofline(dtype, noise, sms=args.sms, clock_ghz=args.clock_ghz, native_bf16=native)
            cells = "".join(f"{b[k]:>10.2e}" if k in b else f"{'-':>10}" for k in ("issue", "int", "imad", "fp32",
                                                                                     "conversion"))
            gather = f"{b['L1 table gather']:>11.2e}" if "L1 table gather" in b else f"{'-':>11}"
            print(f"{dtype:<6}{noise:<14}{per:>15.1f}{cells}{gather}{ceiling:>10.2e}")
    if not args.training:
        return
    print(f"\ntraining passes (grouped kernel, c and go read on the device, decay on), sm_90 SASS; "
          f"SASS instructions per element, and the lowest of the pipe, gather and HBM bounds "
          f"({args.hbm_tbps} TB/s, one read + one write per element per pass) in elements/s")
    kinds = ("PERTURB", "RESTORE_UPDATE", "P3+P1 apart", "UPDATE_PERTURB")
    print(f"{'dtype':<6}{'noise':<14}" + "".join(f"{k:>22}" for k in kinds) + f"{'fused/apart':>13}")
    for dtype in dtypes:
        for noise in ("gaussian16", "rademacher16"):
            r = training_passes(dtype, noise, sms=args.sms, clock_ghz=args.clock_ghz, hbm_tbps=args.hbm_tbps,
                                native_bf16=native)
            cells = "".join(f"{r[k][0]:>10.1f} {r[k][1]:>10.2e} " for k in kinds)
            ratio = r["UPDATE_PERTURB"][0] / r["P3+P1 apart"][0]
            print(f"{dtype:<6}{noise:<14}{cells}{ratio:>12.0%} (time {r['UPDATE_PERTURB'][1] / r['P3+P1 apart'][1]:.2f}x less)")


if __name__ == "__main__":
    main()

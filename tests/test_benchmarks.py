"""The benchmark scripts in tools/ keep running: each in a tiny configuration, and each one that compares
the bytes of two paths must fail (exit 1, one FAIL line) when they differ, which --inject-mismatch forces
by flipping one bit of one path's result. No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import bench_lora_rebuild  # noqa: E402
import bench_reconstruct  # noqa: E402
import bench_replay  # noqa: E402
import bench_train_step  # noqa: E402


def test_replay_runs_and_reports_medians_and_the_extrapolation(capsys):
    bench_replay.main(["--elements", "5000", "--steps", "2", "--repeats", "2", "--reference-elements", "1000"])
    out = capsys.readouterr().out
    assert "median of 2 after 1 warm-up" in out
    assert "numpy reference *" in out and "* extrapolated" in out  # timed on 1,000 of 5,000 elements
    assert "bytes identical: replay, first 1,000 elements: torch == numpy reference" in out


def test_replay_says_nothing_is_extrapolated_when_nothing_is(capsys):
    bench_replay.main(["--elements", "1000", "--steps", "1", "--repeats", "1", "--warmup", "0"])
    assert "extrapolated" not in capsys.readouterr().out


def test_replay_mismatch_fails_the_run_in_a_subprocess():
    """The real script as a user runs it: exit status 1 and one FAIL line naming the two paths."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_replay.py"), "--elements", "3000", "--steps", "1",
                           "--repeats", "1", "--warmup", "0", "--inject-mismatch"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [line for line in proc.stderr.splitlines() if line.startswith("FAIL:")]
    assert len(fails) == 1 and "differ" in fails[0] and "Traceback" not in proc.stderr


def test_reconstruct_runs_and_checks_bytes(tmp_path, capsys):
    csv = tmp_path / "r.csv"
    bench_reconstruct.main(["--sweep", "--sweep-params", "70000", "--sweep-steps", "3,6", "--repeats", "2",
                            "--csv", str(csv), "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("run 2 == run 1") == 2 and out.count("== torch path") == 2
    lines = csv.read_text().splitlines()
    assert lines[0] == "params,steps,median_seconds,min_seconds,max_seconds,repeats" and len(lines) == 3


def test_reconstruct_mismatch_fails(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_reconstruct.main(["--params", "70000", "--steps", "2", "--repeats", "1", "--warmup", "0",
                                "--inject-mismatch", "--workdir", str(tmp_path)])
    assert e.value.code == 1 and "FAIL: reconstruct" in capsys.readouterr().err


def test_train_step_runs_and_mismatch_fails(capsys):
    tiny = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "8",
            "--repeats", "2"]
    bench_train_step.main(tiny)
    out = capsys.readouterr().out
    assert "mezo-replay settled" in out and "reference MeZO" in out and "backend auto == torch path" in out
    assert "x forwards" in out
    for how in ("fused", "queued"):
        assert f"mezo-replay {how}" in out
        assert f"after two {how} MeZO steps and settle(): backend auto == torch path" in out
    with pytest.raises(SystemExit) as e:
        bench_train_step.main(tiny + ["--inject-mismatch", "--repeats", "1", "--warmup", "0"])
    assert e.value.code == 1 and "FAIL: sha256 of the weights" in capsys.readouterr().err


TINY_LORA = ["--layers", "1", "--hidden", "256", "--r", "4", "--steps", "30", "--check-elements", "300"]


def test_lora_rebuild_runs_and_checks_bytes(tmp_path, capsys):
    """The base-less rebuild, fingerprint-checked, beside the one-tensor baseline; runs agree and the
    first elements of an A and a B tensor equal the plain torch path's."""
    bench_lora_rebuild.main([*TINY_LORA, "--repeats", "2", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "4 F32 tensors (r=4 on q_proj, v_proj of 1 layers, hidden 256), 4,096 parameters x 30 steps" in out
    assert "rebuild: plan(None) + replayed" in out and "baseline: one 4,096-element F32 tensor" in out
    assert "element-steps/s" in out and "element-steps per CPU-second" in out and "target (CPU)" in out
    assert "bytes identical: rebuilt adapter, sha256 over all tensors: run 2 == run 1" in out
    assert "q_proj.lora_A.weight: rebuild == torch path" in out and "q_proj.lora_B.weight: rebuild == torch path" in out


def test_lora_rebuild_of_real_mezo_steps_and_mismatch_fails(tmp_path, capsys):
    """--record mezo: the final fingerprint comes from training itself; a flipped bit fails the run."""
    bench_lora_rebuild.main([*TINY_LORA, "--record", "mezo", "--steps", "3", "--repeats", "1", "--warmup", "0",
                             "--no-baseline", "--workdir", str(tmp_path)])
    assert "final fingerprint was written by training" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_lora_rebuild.main([*TINY_LORA, "--repeats", "1", "--warmup", "0", "--no-baseline", "--inject-mismatch",
                                 "--workdir", str(tmp_path)])
    assert e.value.code == 1 and "FAIL: first 300 elements of" in capsys.readouterr().err


def test_lora_adapters_one_after_another_in_a_subprocess(tmp_path):
    """--adapters: a fresh process per count, the table of times and memory, and each adapter's bytes the
    same in both runs; --inject-mismatch makes that comparison fail with exit 1."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    cmd = [sys.executable, str(TOOLS / "bench_lora_rebuild.py"), *TINY_LORA, "--steps", "5", "--adapters", "2,3",
           "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["2"], ["3"])]
    assert [r[0] for r in rows] == ["2", "3"] and all(len(r) == 7 for r in rows)
    assert ("bytes identical: sha256 of adapter_model.safetensors of user0000 .. user0001 (2 adapters): "
            "the 3-adapter run == the first run") in proc.stdout
    proc = subprocess.run(cmd + ["--inject-mismatch"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1 and "FAIL: sha256 of adapter_model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def _train_has_peft() -> bool:
    proc = subprocess.run([sys.executable, "-m", "mezo_replay", "train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(TOOLS.parent)})
    return "--num-virtual-tokens" in proc.stdout


def test_peft_task_compares_modes_and_checks_rebuilds(tmp_path):
    """The real CLI trains each mode; every trajectory is rebuilt and checked against training's end."""
    if not _train_has_peft():
        pytest.skip("train --peft is not in this checkout")
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_peft_task.py"), "--steps", "2", "--modes", "lora,prefix",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith(("lora ", "prefix "))]
    assert [r[:2] for r in table] == [["lora", "1e-3"], ["prefix", "1e-2"]]
    assert "rebuilt from the trajectory alone: " in proc.stdout
    assert "bytes identical: every rebuild equals the weights its training ended with" in proc.stdout


@pytest.mark.slow
def test_peft_task_full_tuning_and_mismatch_fails(tmp_path):
    if not _train_has_peft():
        pytest.skip("train --peft is not in this checkout")
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    cmd = [sys.executable, str(TOOLS / "bench_peft_task.py"), "--steps", "2", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd + ["--modes", "full"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "rebuilt from the trajectory and the base" in proc.stdout, proc.stderr
    proc = subprocess.run(cmd + ["--modes", "lora", "--inject-mismatch"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 1 and "FAIL: lora lr 1e-3" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_check_fits_one_device_call():
    """Its stage limits add up to less than one 10-minute call, and every stage names a script that exists."""
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh")], env={**os.environ, "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = [line for line in proc.stdout.splitlines() if line.startswith("stage ")]
    assert len(stages) >= 8 and any(line.split()[1] == "profile" for line in stages)
    for line in stages:
        for word in line.split():
            if word.startswith("tools/") or word.startswith("tests/"):
                path, _, test = word.partition("::")  # a single test: its file exists and defines it
                assert (TOOLS.parent / path).exists(), word
                assert not test or f"def {test}(" in (TOOLS.parent / path).read_text(), word


@pytest.mark.slow
def test_train_memory_runs(capsys):
    import bench_train_memory

    bench_train_memory.main(["--shape", "tiny", "--dtype", "fp32", "--batch", "2", "--seq", "8", "--steps", "1",
                             "--repeats", "1"])
    assert "MeZO - inference" in capsys.readouterr().out


def test_train_memory_lora_compares_with_inference_of_the_same_model(capsys):
    import bench_train_memory

    bench_train_memory.main(["--shape", "llama-tiny", "--peft", "lora", "--dtype", "fp32", "--batch", "2", "--seq", "8",
                             "--steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "LoRA r=8 on q_proj, v_proj by peft" in out and "MeZO-LoRA steps" in out
    assert "MeZO-LoRA peak <= inference peak + adapter:" in out


@pytest.mark.slow
def test_end_to_end_runs_and_mismatch_fails(tmp_path, capsys):
    import bench_end_to_end

    bench_end_to_end.main(["--steps", "3", "--repeats", "1", "--warmup", "0", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "trajectory   " in out and "verified by reconstruct" in out
    with pytest.raises(SystemExit) as e:
        bench_end_to_end.main(["--steps", "2", "--repeats", "1", "--warmup", "0", "--inject-mismatch",
                               "--workdir", str(tmp_path)])
    assert e.value.code == 1 and "FAIL: trajectory sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_roofline_derives_a_ceiling():
    """In a subprocess: compiling for sm_90 needs TRITON_INTERPRET unset, which conftest sets for the suite."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{TOOLS.parent}{os.pathsep}{TOOLS}"
    code = ("from roofline import roofline; c, b, per = roofline('F32', 'rademacher16'); "
            "assert c == min(b.values()) and per > 0; print('ceiling', c)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ceiling" in proc.stdout, proc.stderr


def test_profile_train_step_runs_on_the_cpu_in_a_subprocess():
    """The profile as a user runs it: the split of the step, the top ops, the value reads, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    proc = subprocess.run([sys.executable, str(TOOLS / "profile_train_step.py"), "--shape", "tiny", "--device", "cpu",
                           "--dtype", "fp32", "--batch", "2", "--seq", "8", "--steps", "2", "--warmup", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for expected in ("profile of 2 MeZO steps", "host time per step", "forward", "perturb_all_", "record",
                     "value reads from Python per step", "top ops by self CPU time", "time outside any torch op"):
        assert expected in out, expected
    bad = subprocess.run([sys.executable, str(TOOLS / "profile_train_step.py"), "--shape", "tiny", "--steps", "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["Error: --steps must be at least 1 and --warmup at least 0"]


def test_profile_reads_host_gaps_and_syncs_from_a_cuda_trace(capsys):
    """The CUDA half of the report, on a hand-made trace (no GPU here): one step, a forward launching two
    kernels 10 us apart, a sync and a device-to-host copy, then a noise pass's kernel after a 100 us gap."""
    import profile_train_step as prof

    def ev(name, cat, start, dur, corr=None, tid=1):
        return prof.Event(name, cat, start, start + dur, tid, corr)

    events = [
        ev("mezo step 1", "user_annotation", 0, 1000),
        ev("forward", "user_annotation", 10, 300),
        ev("aten::addmm", "cpu_op", 20, 30),
        ev("cudaLaunchKernel", "cuda_runtime", 25, 5, corr=1),
        ev("cudaLaunchKernel", "cuda_runtime", 60, 5, corr=2),
        ev("cudaMemcpyAsync", "cuda_runtime", 400, 5, corr=3),
        ev("cudaStreamSynchronize", "cuda_runtime", 405, 50),
        ev("perturb_all_", "user_annotation", 500, 100),
        ev("cudaLaunchKernel", "cuda_runtime", 510, 5, corr=4),
        ev("gemm", "kernel", 100, 50, corr=1, tid=7),
        ev("softmax", "kernel", 160, 40, corr=2, tid=7),
        ev("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy", 200, 2, corr=3, tid=7),
        ev("noise", "kernel", 302, 20, corr=4, tid=7),
    ]
    prof.report(events, True, [1], top=5, gaps_shown=2)
    out = capsys.readouterr().out
    assert "span 0.22 ms, busy 0.11 ms" in out  # 100..322 us; 50 + 40 + 2 + 20 us busy
    assert "host gaps (device idle between consecutive kernels" in out and "0.11 ms per step" in out
    assert "0.100 ms  step 1: after 'Memcpy DtoH (Device -> Pageable)' before 'noise', launched in perturb_all_" in out
    assert "0.010 ms  step 1: after 'gemm' before 'softmax', launched by 'aten::addmm'" not in out  # 60 is outside addmm
    assert "cudaStreamSynchronize 1, DtoH copies 1" in out
    assert "top kernels by self device time" in out and "gemm" in out


def test_fused_pass_bench_runs_and_compares_bytes(capsys):
    """tools/bench_fused_pass.py in a tiny configuration: every row prints, and no row reports a difference."""
    import bench_fused_pass
    from mezo_replay.kernels import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not built")
    bench_fused_pass.main(["--elements", "4099", "--repeats", "1", "--warmup", "0", "--dtype", "BF16", "F16"])
    out = capsys.readouterr().out
    assert "steps (threaded)" in out and "FAIL" not in out
    assert out.count("apart/fused") == 1 and out.count("kernel ") == 2 * len(cpu_kernel.isas())


def test_variants_bench_prints_the_table_and_draws_the_chart(tmp_path):
    """The real script in a subprocess, two codecs on the embedded task: each trained by the CLI, its printed
    reconstruct verified, the table and the eval-loss curve printed and the PNG written."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent), "OMP_NUM_THREADS": "1"}
    png = tmp_path / "variants.png"
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_variants.py"), "--quick", "--variants", "bf16,fp8,nspsa-2",
                           "--out", str(png), "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("bf16 ", "fp8 ", "nspsa-2 ")) and " MiB " in line}
    assert rows["bf16"][2] == "1.00x" and rows["fp8"][2].endswith("x")  # figure, then ratio to the baseline
    assert "embedded: 4 steps (8 training forward passes;" in proc.stdout
    assert "forward passes                 0       4       8" in proc.stdout
    # n-SPSA with 2 perturbations: 2 steps of 4 forward passes, evaluated at the same passes as the others
    curve = [line.split() for line in proc.stdout.splitlines() if line.startswith("nspsa-2 ") and " MiB " not in line]
    assert len(curve) == 1 and len(curve[0]) == 4 and "-" not in curve[0], proc.stdout
    assert "verified: every rebuild matched the final fingerprint" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

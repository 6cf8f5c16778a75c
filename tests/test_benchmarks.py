"""The benchmark scripts run end to end (tiny settings; their numbers are not checked, only that they come out)."""

import importlib.util
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# step_time's malloc setting is process-wide and for good: runs inside the test session leave the allocator alone
AS_IT_COMES = ("--no-keep-freed-memory",)


def tiny_mbclip_run(repeats: int = 1) -> list:
    """``step_time`` arguments for plain and mbclip at b = 8 on a batch of 8 images, in the test session."""
    sizes = ["--microbatch-sizes", "8", "--batch-size", "8", "--repeats", str(repeats)]
    return ["--models", "cnn", *sizes, "--methods", "mbclip", *AS_IT_COMES]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_step_time_prints_every_method(capsys):
    step_time = load("step_time")
    step_time.main(
        ["--models", "cnn", "--microbatch-sizes", "1,8", "--batch-size", "8", "--repeats", "1", *AS_IT_COMES]
    )
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for method in ("plain", "opacus", "opacus_ghost", "naive_b1", "naive_b8", "mbclip_b1", "mbclip_b8"):
        assert method in rows and "n/a" not in rows[method], out


def test_step_time_prints_the_spread_of_the_paired_ratios(capsys):
    step_time = load("step_time")
    assert step_time.ratio_spread([1.2]) == ""  # one round: no spread to show
    assert step_time.ratio_spread([1.0, 1.1, 1.2, 1.3, 1.4]) == "1.10-1.30"
    step_time.main(tiny_mbclip_run(3))
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert rows["method"][4].strip() == "q1-q3", out
    first, third = (float(q) for q in rows["mbclip_b8"][4].split("-"))
    assert 0 < first <= third, out
    assert rows["plain"][4].strip() == "", out  # plain's ratio to itself is 1 by definition


def test_step_time_names_the_cpu_it_ran_on(capsys):
    step_time = load("step_time")
    described = step_time.cpu_description()
    assert described and "cores" in described
    step_time.main(tiny_mbclip_run())
    header = capsys.readouterr().out.splitlines()[0]
    assert f"CPU: {described}" in header, header
    assert header.endswith("malloc: as it comes"), header


def test_memory_runs_keep_the_profilers_native_lines_off_stderr(capfd):
    step_time = load("step_time")

    def noisy_step():
        os.write(2, b"native noise\n")  # as torch's profiler writes its start and stop lines, from C++
        torch.ones(1000).sum()

    assert step_time.peak_memory(noisy_step, torch.device("cpu")) >= 0
    os.write(2, b"stderr is back\n")
    err = capfd.readouterr().err
    assert "native noise" not in err and "profiler_start" not in err, err
    assert "stderr is back" in err


def test_step_time_refuses_a_device_it_cannot_use(capsys):
    step_time = load("step_time")
    with pytest.raises(SystemExit):
        step_time.parse_args(["--device", "no-such-device"])
    assert "--device" in capsys.readouterr().err


def test_per_call_overhead_prints_the_three_phases(capsys):
    load("per_call_overhead").main(["--depth", "2", "--rounds", "2"])
    out = capsys.readouterr().out
    for phase in ("forward", "backward", "step"):
        assert f"| {phase}" in out, out


def test_step_time_runs_only_the_methods_asked_for(capsys):
    step_time = load("step_time")
    step_time.main(tiny_mbclip_run())
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["method", "plain", "mbclip_b8"], out
    with pytest.raises(SystemExit):
        step_time.parse_args(["--methods", "mbclip,dp_sgd"])
    assert "dp_sgd" in capsys.readouterr().err


def test_step_time_counts_page_faults_and_can_keep_freed_memory(capsys):
    step_time = load("step_time")
    assert step_time.parse_args([]).keep_freed_memory
    assert not step_time.parse_args(["--no-keep-freed-memory"]).keep_freed_memory
    taken, faults = step_time.timed(lambda: torch.ones(1 << 20).sum(), torch.device("cpu"))
    assert taken > 0 and (faults is None or faults >= 0)
    # the allocator setting is process-wide and for good: try it in a child process, not in the test session
    arguments = [a for a in tiny_mbclip_run() if a not in AS_IT_COMES] + ["--no-memory"]
    script = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import step_time; step_time.main({arguments!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert "malloc: keeps freed memory" in header or "malloc: as it comes (not glibc" in header, header
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines if line.startswith("| ")}
    assert rows["method"][7].strip() == "faults", done.stdout
    if platform.libc_ver()[0] == "glibc":
        assert "malloc: keeps freed memory" in header, header


def test_time_breakdown_prints_phases_layers_and_step_parts(capsys):
    time_breakdown = load("time_breakdown")
    time_breakdown.main(
        ["--models", "cnn", "--microbatch-sizes", "4", "--batch-size", "8", "--rounds", "2", "--no-keep-freed-memory"]
    )
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for label in ("forward", "backward", "step", "step: norms", "step: weighted sums", "0 (Conv2d)", "2 (GroupNorm)"):
        assert label in rows, out
    assert rows["0 (Conv2d)"].split("|")[3].strip() == "1", out  # one call of the first convolution per step
    from mbclip.grad_module import MicroBatchGradSampleModule

    assert not hasattr(MicroBatchGradSampleModule._on_output_grads, "__wrapped__")  # the wrappers are gone

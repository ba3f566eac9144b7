"""The GPU check's pieces that run anywhere: kernel choice on CUDA, the GGUF group's device, fp16 tiny
models, the carried wheels' closure, the per-stage measurements, and (slow) the whole check on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import device_check  # noqa: E402
import device_closure  # noqa: E402


@pytest.mark.parametrize(("bits", "group", "backend"), [(4, 128, "gptq_triton"), (8, None, "gptq_triton"),
                                                         (3, 64, "gptq_torch")])
def test_gptq_on_cuda_loads_with_a_kernel_that_needs_nothing_compiled(bits, group, backend, monkeypatch):
    from quantpub.backends import backend as table

    monkeypatch.delenv("QUANTPUB_CUDA_KERNELS", raising=False)
    gptq = table("gptq")
    params = gptq.read_parameters({"bits": bits, "group_size": group, "act_order": True, "sym": True, "damp": 0.01})
    config = gptq.loader_kwargs(Path("."), params, "cuda")["quantization_config"]
    assert (config.backend, config.bits, config.group_size, config.desc_act) == (backend, bits, group or -1, True)


def test_awq_on_cuda_loads_with_triton_gemm_and_auto_leaves_the_choice_to_gptqmodel(monkeypatch):
    from quantpub.backends import backend as table

    monkeypatch.delenv("QUANTPUB_CUDA_KERNELS", raising=False)
    awq, gptq = table("awq"), table("gptq")
    gemm = awq.read_parameters({"bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM"})
    config = awq.loader_kwargs(Path("."), gemm, "cuda")["quantization_config"]
    assert (config.backend, config.group_size, config.zero_point) == ("gemm_triton", 128, True)
    assert awq.loader_kwargs(Path("."), gemm.model_copy(update={"version": "GEMV"}), "cuda") == {}
    assert awq.loader_kwargs(Path("."), gemm, "cpu") == {}
    monkeypatch.setenv("QUANTPUB_CUDA_KERNELS", "auto")
    assert gptq.loader_kwargs(Path("."), gptq.read_parameters({"bits": 4, "group_size": 128}), "cuda") == {}


def test_gguf_group_computes_its_importance_matrix_where_a_gpu_is_visible():
    import torch

    from quantpub.build_gguf import _imatrix_device as gguf_device

    assert gguf_device("cpu") == "cpu"
    assert gguf_device("cuda") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tiny_model_in_fp16(tmp_path, corpus):
    from safetensors import safe_open

    from quantpub.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m", text=corpus.read_text(), dtype="float16")
    config = json.loads((model / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "float16"
    with safe_open(model / "model.safetensors", "pt") as st:
        assert {str(st.get_tensor(k).dtype) for k in st.keys()} == {"torch.float16"}
    assert device_check.parameters(model) == 2 * 1024 * 256 + 2 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 256
    with pytest.raises(ValueError, match="unknown dtype"):
        build_tiny_model(tmp_path / "x", text="x", dtype="int8")


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: {name}\n" +
                   "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_closure_names_what_the_machine_would_lack(tmp_path):
    machine = device_closure.machine_packages(REPO_ROOT / "scripts" / "device-packages.txt")
    _wheel(tmp_path, "alpha", "1.0", ["torch>=2.8", "beta==2.0", "gamma; python_version < '3.10'",
                                      "pytest; extra == 'test'"])
    _wheel(tmp_path, "beta", "2.0", ["transformers>=5.20", "nosuchpackage"])
    problems = device_closure.check(tmp_path, machine)
    assert sorted(problems) == ["beta needs nosuchpackage: neither carried nor on the machine",
                                "beta needs transformers>=5.20; transformers 5.17.0 is on the machine"]
    _wheel(tmp_path, "transformers", "5.23.0", [])
    _wheel(tmp_path, "nosuchpackage", "1", [])
    assert device_closure.check(tmp_path, machine) == []


def test_stage_measurements_come_from_the_samples_in_its_window():
    samples = [{"t": float(t), "gpu_busy": busy, "gpu_mem": mem << 20, "host_used": 0,
                "procs": {1: (0, 100 << 20), 2: (1, rss << 20), 3: (2, 5 << 20)}}
               for t, busy, mem, rss in [(0, 0, 1000, 10), (1, 50, 3000, 40), (2, 100, 5000, 20), (3, 0, 1000, 10)]]
    assert device_check.tree_rss(samples[1]["procs"], 2) == 45 << 20
    row = device_check.measure(samples, 0.5, 2.5, 2, gpu_base=1000 << 20)
    assert row == {"wall_s": 2.0, "gpu_busy": 0.75, "peak_gpu_mib": 4000, "peak_host_mib": 45}
    short = device_check.measure(samples, 2.9, 3.0, 2, gpu_base=1000 << 20)
    assert short["gpu_busy"] == 0.0 and short["peak_host_mib"] == 15


def test_sampler_reads_the_gpu_through_nvml_and_the_run_s_processes(monkeypatch):
    import types

    calls = []
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or "h",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        time.sleep(1)
        sample = device_check.Sampler(os.getpid()).sample()
    finally:
        child.kill()
    assert calls == ["init", 1] and (sample["gpu_busy"], sample["gpu_mem"]) == (37, 3 << 30)
    assert sample["procs"][child.pid][0] == os.getpid() and sample["procs"][child.pid][1] > 64 << 20
    assert device_check.tree_rss(sample["procs"], os.getpid()) > sample["procs"][child.pid][1]


@pytest.mark.slow
def test_cpu_dry_run_of_the_device_check(tmp_path):
    """The whole check on CPU with a tiny model: every stage done, every variant measured (about 3 minutes)."""
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE_CHECK_WORK": str(tmp_path / "work"), "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/device-check.sh", "--cpu-dry-run"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["state"]) for r in results["stages"]] == [
        ("quantize-gpu", "done"), ("quantize-gguf", "done"), ("evaluate", "done"), ("publish", "done")]
    assert all(r["wall_s"] > 0 and r["peak_host_mib"] > 0 for r in results["stages"])
    assert len(results["variants"]) == 11 and all(v["ppl"] for v in results["variants"])
    assert "every stage done" in (out / "report.txt").read_text()
    with __import__("tarfile").open(out / "logs.tar.gz") as tar:
        assert any(n.endswith("quantize-gpu.log") for n in tar.getnames())

"""The GPU check: a ~1B random-weight fp16 llama through ``quantpub run`` on CUDA, measured per stage.

    python scripts/device_check.py [--cpu-dry-run] [--out DIR] [--work DIR]

Run by ``scripts/device-check.sh`` (which installs the carried wheels first). It builds the model,
writes calibration and held-out text, derives a matrix from the shipped ``thebloke.yaml`` (the six
GPTQ branches and AWQ; four GGUF types) with the calibration shape scaled down, runs
``python -m quantpub run ... --device cuda -q`` while a thread samples the GPU (NVML: busy
percentage and memory) and the run's processes (RSS), then prints per stage of the run's ledger
the wall time, GPU busy fraction, peak GPU memory and peak host memory of the stage's process
tree, and the kernel each GPTQ/AWQ variant was validated with. Results go to ``OUT/results.json``
and ``OUT/report.txt``, the run's logs to ``OUT/logs.tar.gz``. Exit 1 when a stage or variant
failed or the run overran its share of the budget. ``--cpu-dry-run``: the same flow on CPU with a
tiny model, to test this script where there is no GPU.

Sizes (environment): DEVICE_CHECK_SAMPLES / DEVICE_CHECK_SEQ_LEN (calibration, default 32 x 512
against the matrix's 128 x 2048), DEVICE_CHECK_LAYERS (18), DEVICE_CHECK_BUDGET (seconds for the
whole check, default 470; the run is stopped at what is left of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GGUF_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
MODELS = {  # ~0.99B parameters: 18 x 51.4M in the blocks + 2 x 16000 x 2048 embeddings (untied)
    "gpu": dict(hidden_size=2048, intermediate_size=5632, layers=18, heads=16, vocab_size=16000, dtype="float16"),
    "cpu": dict(hidden_size=256, intermediate_size=512, layers=2, heads=4, vocab_size=1024, dtype="float16"),
}
SHAPE = {"gpu": (32, 512), "cpu": (8, 128)}  # calibration samples x tokens
EVALUATION = {"gpu": [], "cpu": ["--context", "128", "--windows", "2"]}  # gpu: the matrix's 8 x 512


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


class Sampler(threading.Thread):
    """Every ``interval`` seconds: GPU busy % and memory (NVML, else nvidia-smi), RSS of the run's processes."""

    def __init__(self, root_pid: int, interval: float = 0.25):
        super().__init__(daemon=True, name="sampler")
        import psutil

        self.psutil, self.root, self.interval = psutil, psutil.Process(root_pid), interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.gpu = self._gpu_reader()

    @staticmethod
    def _gpu_reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0] or 0)
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def read():
                return (pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                        pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            read()
            return read
        except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi, else no GPU figures
            pass
        try:
            subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

        def read_smi():
            line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
                                   "nounits", "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            busy, mib = line.split(",")
            return int(busy), int(mib) << 20
        return read_smi

    def sample(self) -> dict:
        procs = {}
        try:
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    procs[p.pid] = (p.ppid(), p.memory_info().rss)
                except self.psutil.Error:
                    continue
        except self.psutil.Error:
            pass
        out = {"t": time.time(), "procs": procs, "host_used": self.psutil.virtual_memory().used}
        if self.gpu:
            try:
                out["gpu_busy"], out["gpu_mem"] = self.gpu()
            except Exception as exc:  # noqa: BLE001 - a missed GPU reading must not end the sampling
                out["gpu_error"] = str(exc)[:200]
        return out

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.sample())
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def tree_rss(procs: dict[int, tuple[int, int]], pid: int) -> int:
    """RSS of ``pid`` and every descendant in one sample."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
            todo += [c for c, (parent, _) in procs.items() if parent == p]
    return total


def measure(samples: list[dict], start: float, end: float, pid: int | None, gpu_base: int) -> dict:
    """GPU busy fraction, peak GPU memory (above the idle baseline) and peak host RSS in [start, end]."""
    window = [s for s in samples if start <= s["t"] <= end]
    if not window and samples:  # a stage shorter than one sampling interval: the nearest sample
        window = [min(samples, key=lambda s: abs(s["t"] - (start + end) / 2))]
    gpu = [s for s in window if "gpu_busy" in s]
    return {
        "wall_s": round(end - start, 2),
        "gpu_busy": round(sum(s["gpu_busy"] for s in gpu) / len(gpu) / 100, 3) if gpu else None,
        "peak_gpu_mib": round(max(s["gpu_mem"] - gpu_base for s in gpu) / 2**20) if gpu else None,
        "peak_host_mib": round(max(tree_rss(s["procs"], pid) for s in window) / 2**20) if pid and window else None,
    }


def prepare(work: Path, mode: str, samples: int, seq_len: int, layers: int) -> tuple[Path, Path, Path, Path, dict]:
    """The model, calibration and held-out text, and the check's matrix (built once per work dir)."""
    from quantpub.tiny import SHAPES, build_tiny_model, corpus_text

    model, calib, held_out, matrix = work / "model", work / "calibration.txt", work / "held-out.txt", work / "matrix.yaml"
    spec = {**MODELS[mode], **({"layers": layers} if mode == "gpu" else {})}
    built = work / "model-spec.json"
    if not built.is_file() or json.loads(built.read_text()) != spec:
        shutil.rmtree(model, ignore_errors=True)
        text = corpus_text()
        cut = int(len(text) * 0.8)
        work.mkdir(parents=True, exist_ok=True)
        calib.write_text(text[:cut])
        held_out.write_text(text[cut:])
        build_tiny_model(model, "llama", text=text[:cut], **spec)
        built.write_text(json.dumps(spec))
    shipped = yaml.safe_load((REPO / "src" / "quantpub" / "matrices" / "thebloke.yaml").read_text())
    seq = shipped["calibration"]["seq_len"]  # auto: min(the model's context, 4096)
    real = (shipped["calibration"]["n_samples"],
            min(SHAPES["llama"]["max_position_embeddings"], 4096) if seq == "auto" else seq)
    shipped["calibration"].update(n_samples=samples, seq_len=seq_len)
    shipped["gguf"]["types"] = GGUF_TYPES
    header = (f"# scripts/device_check.py: thebloke.yaml with {len(GGUF_TYPES)} GGUF types and the calibration\n"
              f"# scaled from {real[0]} x {real[1]} to {samples} x {seq_len} tokens "
              f"({samples * seq_len / (real[0] * real[1]):.3g} of the tokens).\n")
    matrix.write_text(header + yaml.safe_dump(shipped, sort_keys=False))
    return model, calib, held_out, matrix, {**spec, "parameters": parameters(model), "calibration": [samples, seq_len],
                                            "matrix_calibration": list(real), "gguf_types": GGUF_TYPES}


def parameters(model: Path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def run_quantpub(args: list[str], limit: float, log: Path) -> tuple[int, bool, Sampler]:
    """``python -m quantpub run ARGS`` with the sampler on; stopped (SIGINT, then SIGKILL) after ``limit`` s."""
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "quantpub", "run", *args], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = Sampler(proc.pid)
        sampler.samples.append(sampler.sample())  # the idle baseline
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)  # the run closes its ledger and marks running stages
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        finally:
            sampler.stop()
    return rc, timed_out, sampler


def stage_rows(run_dir: Path, sampler: Sampler) -> tuple[list[dict], dict]:
    """One row per stage of the run's ledger, and the whole run's row."""
    from quantpub.ledger import Ledger

    ledger = Ledger(run_dir / "ledger.sqlite3")
    try:
        run = ledger.last_run()
        stages = ledger.stages(run) if run else []
        started, ended = ledger.run_span(run) if run else (sampler.samples[0]["t"], sampler.samples[-1]["t"])
    finally:
        ledger.close()
    samples = sampler.samples
    base = samples[0].get("gpu_mem", 0)
    rows = [{"stage": s.stage, "model": Path(s.model).name, "try": s.attempt, "state": s.state, "gpu": s.gpu,
             "start_s": round(s.started - started, 1), "error": s.error,
             **measure(samples, s.started, s.ended or samples[-1]["t"], s.pid, base)} for s in stages]
    total = {"stage": "run (all)", "state": "", **measure(samples, started, ended, sampler.root.pid, base),
             "peak_system_host_mib": round(max(s["host_used"] for s in samples) / 2**20),
             "peak_gpu_mib_absolute": round(max(s.get("gpu_mem", 0) for s in samples) / 2**20) if "gpu_mem" in
             samples[0] else None}
    return rows, total


def variant_rows(run_dir: Path) -> list[dict]:
    """Per variant: state, size, kernel it was validated with, perplexity and KLD, quantize seconds."""
    out = []
    for manifest in sorted(run_dir.glob("*/*/quantpub.json")):
        if manifest.parent.name.startswith(".") or manifest.parents[1].name == "hub":
            continue
        m = json.loads(manifest.read_text())
        validation, evaluation = m.get("validation") or {}, m.get("evaluation") or {}
        out.append({"variant": m["variant"], "method": m["method"], "mb": round(m["size"] / 1e6, 1),
                    "kernel": validation.get("kernel") or validation.get("loaded_with"), "device": m.get("device"),
                    "ppl": evaluation.get("perplexity"), "kld": evaluation.get("kld"),
                    "quantize_s": m.get("quantize_seconds")})
    return out


def jit_builds(since: float) -> list[str]:
    """GPTQModel's JIT-built extensions written since ``since`` (its build root, one folder per extension)."""
    root = Path(os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR") or Path.home() / ".cache/gptqmodel/torch_extensions")
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(
        f.stat().st_mtime >= since for f in d.rglob("*") if f.is_file()))


def cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def report(info: dict, rows: list[dict], total: dict, variants: list[dict], jit: list[str]) -> str:
    lines = [f"device check ({info['mode']}): {info['gpu_name']}, torch {info['torch']}, transformers "
             f"{info['transformers']}, gptqmodel {info['gptqmodel']}",
             f"model: {info['model']['parameters'] / 1e6:,.1f}M parameters {info['model']['dtype']} "
             f"(hidden {info['model']['hidden_size']}, {info['model']['layers']} layers, intermediate "
             f"{info['model']['intermediate_size']}, vocab {info['model']['vocab_size']}); calibration "
             f"{info['model']['calibration'][0]} x {info['model']['calibration'][1]} tokens (the matrix's "
             f"{info['model']['matrix_calibration'][0]} x {info['model']['matrix_calibration'][1]}, scaled); GGUF "
             f"{', '.join(info['model']['gguf_types'])}",
             "phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in info["phases"].items()),
             "", f"{'stage':<15}{'model':<8}{'try':>4} {'state':<12}{'start s':>8}{'wall s':>8}{'GPU busy':>9}"
                 f"{'GPU MiB':>9}{'host MiB':>10}"]
    for r in [*rows, total]:
        lines.append(f"{r['stage']:<15}{r.get('model', ''):<8}{cell(r.get('try')):>4} {r['state']:<12}"
                     f"{cell(r.get('start_s')):>8}{r['wall_s']:>8.1f}{cell(r['gpu_busy'], '{:.0%}'):>9}"
                     f"{cell(r['peak_gpu_mib']):>9}{cell(r['peak_host_mib']):>10}")
    lines.append(f"peak host memory used on the machine {total['peak_system_host_mib']} MiB; GPU memory peak "
                 f"{cell(total['peak_gpu_mib_absolute'])} MiB in all (the columns are above the idle baseline; host "
                 "MiB is the RSS of the stage's process tree)")
    lines += ["", f"{'variant':<34}{'MB':>8}  {'kernel':<22}{'ppl':>10}{'kld':>9}{'quant s':>9}"]
    for v in variants:
        lines.append(f"{v['variant']:<34}{v['mb']:>8.1f}  {cell(v['kernel']):<22}{cell(v['ppl'], '{:.2f}'):>10}"
                     f"{cell(v['kld'], '{:.4f}'):>9}{cell(v['quantize_s'], '{:.1f}'):>9}")
    lines.append("GPTQModel extensions JIT-built during the run: " + (", ".join(jit) if jit else "none"))
    for r in rows:
        if r["state"] != "done" and r.get("error"):
            lines.append(f"{r['stage']} {r['state']}: {r['error'][:300]}")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib import metadata

    import torch

    out = {"torch": torch.__version__,
           "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"}
    for dist in ("transformers", "gptqmodel"):
        out[dist] = metadata.version(dist)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, CPU: test the flow without a GPU")
    parser.add_argument("--work", default=os.environ.get("DEVICE_CHECK_WORK", "/tmp/quantpub-device-check"))
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    begun = float(os.environ.get("DEVICE_CHECK_STARTED") or time.time())  # set by device-check.sh before its installs
    mode = "cpu" if args.cpu_dry_run else "gpu"
    work = Path(args.work)
    out = Path(args.out or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    phases = {"install": time.time() - begun}
    samples, seq_len = SHAPE[mode]
    samples, seq_len = env_int("DEVICE_CHECK_SAMPLES", samples), env_int("DEVICE_CHECK_SEQ_LEN", seq_len)
    t = time.time()
    model, calib, held_out, matrix, model_info = prepare(work, mode, samples, seq_len, env_int("DEVICE_CHECK_LAYERS", 18))
    phases["model"] = time.time() - t
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: a resumed one would skip its stages
    limit = max(60.0, env_int("DEVICE_CHECK_BUDGET", 470 if mode == "gpu" else 1800) - (time.time() - begun) - 15)
    print(f"device-check: model ready ({model_info['parameters'] / 1e6:,.1f}M parameters); quantpub run for at most "
          f"{limit:.0f}s", flush=True)
    t = time.time()
    rc, timed_out, sampler = run_quantpub(
        [str(matrix), "--model", str(model), "--work", str(run_dir), "--device", "cpu" if mode == "cpu" else "cuda",
         "--calibration-file", str(calib), "--eval-file", str(held_out), "-q", *EVALUATION[mode]],
        limit, out / "run-console.log")
    phases["run"] = time.time() - t
    rows, total = stage_rows(run_dir, sampler)
    variants = variant_rows(run_dir)
    jit = jit_builds(t)
    info = {"mode": mode, **versions(), "model": model_info, "phases": {k: round(v, 1) for k, v in phases.items()},
            "quantpub_exit": rc, "timed_out": timed_out, "run_limit_s": round(limit)}
    text = report(info, rows, total, variants, jit)
    failed = rc != 0 or timed_out or any(r["state"] != "done" for r in rows)
    text += f"\nquantpub run exit code {rc}" + (f"; stopped after {limit:.0f}s" if timed_out else "") + \
        ("; FAILED" if failed else "; every stage done")
    print(text, flush=True)
    (out / "report.txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({**info, "stages": rows, "total": total, "variants": variants,
                                                  "jit": jit}, indent=2) + "\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for log in sorted(run_dir.glob("**/*.log")):
            if "hub" not in log.relative_to(run_dir).parts[:1]:
                tar.add(log, arcname=str(log.relative_to(run_dir)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Hermetic tests: every cache in a temp dir, the hub offline, no token.

The environment is set at import, before any test module imports huggingface_hub (which
reads it once), and again per test so subprocesses and call-time reads see the test's dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"
REPO_ROOT = Path(__file__).parent.parent
MATRICES = REPO_ROOT / "matrices"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def _hermetic_env(root: Path) -> dict[str, str]:
    return {
        "HF_HOME": str(root / "hf"),
        "HF_HUB_CACHE": str(root / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "HF_XET_CACHE": str(root / "hf" / "xet"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": "",
        # No runtime venvs: builds outside the compatibility suite record those runtimes as not tested
        # instead of spending their time probing; test_compat_runtimes points here at the real cache.
        "QUANTPUB_VENVS": str(root / "no-venvs"),
    }


_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="quantpub-tests-"))
os.environ.update(_hermetic_env(_SESSION_ROOT))
for _var in TOKEN_VARS[1:]:
    os.environ.pop(_var, None)


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    env = _hermetic_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for var in TOKEN_VARS[1:]:
        monkeypatch.delenv(var, raising=False)
    try:
        from huggingface_hub import constants
    except ImportError:
        return tmp_path
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    return tmp_path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Calibration text: the standard library's docstrings, as a local file."""
    from quantpub.tiny import corpus_text

    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, corpus):
    """Builds tiny random-weight models on first use, once per session: tiny_models('mistral')."""
    from quantpub.tiny import CHATML, build_tiny_model

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(shape: str) -> Path:
        if shape not in built:
            built[shape] = build_tiny_model(root / f"tiny-{shape}", shape, text=corpus.read_text(),
                                            chat_template=CHATML if shape == "mistral" else None)
        return built[shape]

    return get


HUB_TOKEN = "hf_test_write_token_0001"
# Small matrices for whole runs: two GPTQ branches and two GGUF types; one of each.
SMALL_MATRIX = """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
    - {bits: 4, group_size: 32, act_order: true}
gguf:
  types: [Q4_K_M, Q8_0]
"""
ONE_EACH_MATRIX = """\
gptq:
  variants:
    - {bits: 4, group_size: 128}
gguf:
  types: [Q4_K_M]
"""


@pytest.fixture
def local_hub_online(monkeypatch):
    """Lift offline mode for a test that talks to a hub it started on 127.0.0.1 (nothing else is reachable)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(tmp_path, local_hub_online):
    """A real quantpub hub on a free 127.0.0.1 port, with one write token (user 'alice')."""
    from quantpub.hub import HubConfig, start_in_thread

    server, thread = start_in_thread(HubConfig(tmp_path / "hub-data", tokens={HUB_TOKEN: "alice"}))
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="session")
def tulu_build(tiny_models, corpus, tmp_path_factory):
    """Every variant of thebloke.yaml (six Tulu GPTQ branches, AWQ, twelve GGUF types), built once per session from a tiny llama."""
    from quantpub.build import build_from_matrix

    out = tmp_path_factory.mktemp("variants")
    outcomes = build_from_matrix(MATRICES / "thebloke.yaml", str(tiny_models("llama")), out, calibration_file=corpus,
                        device="cpu", n_samples=8, seq_len=128)
    return out, outcomes


def ledger_rows(work: Path):
    """Every variant row of a work dir's ledger."""
    from quantpub.ledger import Ledger

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        return ledger.rows()
    finally:
        ledger.close()


def commit_counts(work: Path, repos=("quantpub/tiny-llama-GPTQ", "quantpub/tiny-llama-AWQ",
                                     "quantpub/tiny-llama-GGUF")) -> dict[tuple[str, str], int]:
    """Commits per (repo, branch) on the work dir's built-in hub (served again for the count)."""
    from huggingface_hub import HfApi

    from quantpub.run import embedded_hub

    server, url, token = embedded_hub(work)
    try:
        api = HfApi(endpoint=url, token=token)
        counts = {}
        for repo in repos:
            if not api.repo_exists(repo):
                continue
            for branch in api.list_repo_refs(repo).branches:
                counts[(repo, branch.name)] = len(api.list_repo_commits(repo, revision=branch.name))
        return counts
    finally:
        server.shutdown()
        server.server_close()


def typed(manifests):
    """A test's manifest dicts as quantpub reads them (``manifest.Manifest``); the fields a test does not care
    about (device, timings, validation) filled in."""
    from quantpub.manifest import Manifest

    def one(m):
        return m if isinstance(m, Manifest) else Manifest.model_validate(
            {"device": "cpu", "quantize_seconds": 0.0, "validation": {}, **m})
    if manifests is None:
        return None
    return [one(m) for m in manifests] if isinstance(manifests, list) else one(manifests)

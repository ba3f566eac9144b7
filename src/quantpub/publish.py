"""Publish finished variants with the unmodified ``huggingface_hub`` client.

A variant with a branch (GPTQ, AWQ) makes its branch exactly equal to its directory: one
commit adds what changed and deletes what the variant no longer has. The ``main`` variant
goes first; every other branch is created from main. GGUF variants add their files to their
repo's main and only ever replace or delete their own files. A repo card rendered by the card
stage (``OUT/cards/<repo name>/README.md``) travels with every commit to that repo; a change of
the card alone (another variant's numbers, an added variant) is one commit to main that says so,
and the other branches keep the card they were published with.

Idempotent: the remote tree is compared with the local files by hash (git blob id for
regular files, sha256 for LFS files) before anything is uploaded; an unchanged variant makes
no commit, a changed one exactly one, built on the head it was compared with
(``parent_commit``, so a concurrent writer makes it fail rather than be overwritten).

What is published is what the builder validated, and nothing is rewritten here: every file is
checked against the sha256 in the variant's ``quantpub.json`` first (``quantpub publish``), or
was checked once when the run started (``quantpub run`` reconciles every finished variant
before anything else and publishes with ``verify=False``: a no-op re-run reads each file once).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from quantpub import naming, progress
from quantpub.artifacts import CARDS_DIR, MANIFEST, digests, sha256_file
from quantpub.errors import PublishError
from quantpub.manifest import Manifest, read as read_manifest

log = logging.getLogger(__name__)
RETRY_STATUS = (429, 500, 502, 503, 504)
T = TypeVar("T")


@dataclass(frozen=True)
class Published:
    variant: str
    repo: str
    branch: str
    commit: str
    changed: bool


@dataclass(frozen=True)
class LocalFile:
    path: str          # path in the repo
    source: Path
    size: int
    sha256: str
    git_oid: str | None = None  # known from the manifest: comparing a regular file reads nothing


def find_variants(out: str | Path) -> list[tuple[Path, Manifest]]:
    """The finished variants in ``out`` (or ``out`` itself) with their manifests, main branches first."""
    out = Path(out)
    if out.name.startswith(".partial-"):
        raise PublishError(str(out), None, "an unfinished build (a killed run left it); it is never published: "
                                           "run the same `quantpub run` again to build it")
    if (out / MANIFEST).is_file():
        dirs = [out]
    else:
        # a dot-directory (.partial-*) is an unfinished build: never a result, whatever it holds
        dirs = sorted(p for p in out.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()) \
            if out.is_dir() else []
    if not dirs:
        raise PublishError(str(out), None, f"no finished variant (a directory with {MANIFEST}) found; "
                                           "run `quantpub quantize` first")
    found = [(d, read_manifest(d)) for d in dirs]
    return sorted(found, key=lambda dm: (dm[1].repo, dm[1].branch != "main", dm[1].variant))


def local_files(d: Path, manifest: Manifest, card: Path | None, *, verify: bool = True) -> list[LocalFile]:
    """The variant's files (in ``d``), each checked against the sha256 the builder recorded unless the caller
    did that already (``verify=False``), and the repo's card (``card``: its README.md) with what the card
    stage put beside it (the quality chart)."""
    files = []
    for name, meta in sorted(manifest.files.items()):
        path = d / name
        if not path.is_file() or path.stat().st_size != meta.size:
            raise PublishError(manifest.repo, manifest.branch,
                               f"{path} is listed in {d / MANIFEST} but missing or of another size; rebuild the "
                               "variant (delete its directory and run the same command again)")
        if verify and sha256_file(path) != meta.sha256:
            raise PublishError(manifest.repo, manifest.branch,
                               f"{path} changed after it was validated (sha256 differs from {d / MANIFEST}); "
                               "rebuild the variant instead of editing it")
        files.append(LocalFile(name, path, meta.size, meta.sha256, meta.git_oid))
    manifest_path = d / MANIFEST
    files.append(LocalFile(manifest.path_in_repo, manifest_path, manifest_path.stat().st_size,
                           sha256_file(manifest_path)))
    if card is not None and card.is_file():
        for path in sorted(p for p in card.parent.iterdir() if p.is_file() and not p.name.startswith(".")):
            files.append(LocalFile(path.name, path, path.stat().st_size, sha256_file(path)))
    return files


def git_blob_id(path: Path) -> str:
    return digests(path)[1]


def retry(call: Callable[[], T], what: str, *, attempts: int = 5, base_wait: float = 1.0) -> T:
    """Retry transient failures (5xx, 429, timeouts, refused connections) with backoff; never 4xx."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return call()
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in RETRY_STATUS or attempt == attempts:
                raise
            reason = f"HTTP {status}"
        except (httpx2.TimeoutException, httpx2.NetworkError) as exc:
            if attempt == attempts:
                raise
            reason = type(exc).__name__
        wait = base_wait * 2 ** (attempt - 1)
        log.warning("%s: %s, retrying in %.0fs (attempt %d of %d)", what, reason, wait, attempt + 1, attempts)
        time.sleep(wait)
    raise AssertionError("unreachable")


def publish(out: str | Path, *, endpoint: str | None = None, token: str | None = None, repo: str | None = None,
            namespace: str | None = None, only: list[str] | None = None, private: bool = False,
            verify: bool = True) -> list[Published]:
    """Publish every finished variant under ``out``.

    Args:
        out: the worker's output directory (or one variant directory).
        endpoint: hub URL; default ``HF_ENDPOINT`` or huggingface.co.
        repo: publish to this repo id instead of the one recorded in the manifests (only when
            all selected variants share one repo).
        namespace: replace the namespace of the recorded repo ids.
        only: variant ids to publish.
        private: create missing repos as private.
        verify: check every file against its manifest's sha256 (False: the caller did, e.g. the run's reconcile).

    Raises:
        PublishError: bad input, a file changed since validation, or a hub error (named with
            the repo and branch).
    """
    from huggingface_hub import HfApi

    out = Path(out)
    found = find_variants(out)
    if only:
        unknown = sorted(set(only) - {m.variant for _, m in found})
        if unknown:
            raise PublishError(str(out), None, f"--only {', '.join(unknown)}: no such finished variant; choose from "
                                               f"{', '.join(m.variant for _, m in found)}")
        found = [(d, m) for d, m in found if m.variant in only]
    if repo is not None:
        repos = {m.repo for _, m in found}
        if len(repos) > 1:
            raise PublishError(repo, None, f"--repo given but the variants belong to {len(repos)} repos "
                                           f"({', '.join(sorted(repos))}); use --only or --namespace")
    cards_root = (out if not (out / MANIFEST).is_file() else out.parent) / CARDS_DIR
    jobs = []  # every file is verified before anything is sent
    for d, manifest in found:
        target = naming.in_namespace(repo or manifest.repo, namespace)
        card = cards_root / naming.repo_name(target) / "README.md"
        jobs.append((manifest, target, local_files(d, manifest, card, verify=verify)))
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = True  # the env var is read at import, which may have happened already
    api = HfApi(endpoint=endpoint, token=token)
    results, created = [], set()
    for manifest, target, files in jobs:
        try:
            if target not in created:
                retry(lambda: api.create_repo(target, private=private, exist_ok=True), f"create {target}")
                created.add(target)
            progress.report(manifest.variant, "uploading")
            result = _publish_variant(api, manifest, target, files)
            results.append(result)
            progress.report(manifest.variant, "published", commit=result.commit, changed=result.changed,
                            repo=result.repo, branch=result.branch)
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(target, manifest.branch or "main",
                               f"{manifest.variant}: {type(exc).__name__}: {exc}", hub=True) from exc
    return results


def _publish_variant(api, manifest: Manifest, repo: str, files: list[LocalFile]) -> Published:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    variant, branch = manifest.variant, manifest.branch or "main"
    owns_branch = manifest.branch is not None
    if branch != "main":
        retry(lambda: api.create_branch(repo, branch=branch, revision="main", exist_ok=True),
              f"create branch {branch} of {repo}")
    info = retry(lambda: api.repo_info(repo, revision=branch, files_metadata=False), f"read {repo}@{branch}")
    head = info.sha
    remote = {f.path: f for f in retry(lambda: list(api.list_repo_tree(repo, revision=head, recursive=True)),
                                       f"list {repo}@{branch}") if hasattr(f, "size")}
    changed_files = [f for f in files if not _same(remote.get(f.path), f)]
    total = sum(f.size for f in changed_files)
    sent = [0]

    def count(n: int) -> None:
        sent[0] += n
        progress.report(variant, "uploading", step=min(sent[0], total), steps=total)

    readers = [_CountingReader(f.source) for f in changed_files]
    ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=r) for f, r in zip(changed_files, readers)]
    for r in readers:  # hashing the files above read them once; count only what is sent
        r.counter = count
    local = {f.path for f in files}
    if owns_branch:
        stale = [p for p in remote if p not in local and p != ".gitattributes"]
    else:  # GGUF on a shared main: only this variant's own files (e.g. a split set that shrank)
        stale = [p for p in remote if p not in local and _owned_by(p, manifest)]
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    own = {*manifest.files, manifest.path_in_repo}
    if branch != "main" and not stale and not any(f.path in own for f in changed_files):
        # only the card moved (another variant's numbers): it is updated on main, where the repo page shows it;
        # a variant's own branch keeps the card it was published with
        log.info("%s: %s@%s has these files; its card is updated on main only", variant, repo, branch)
        return Published(variant, repo, branch, head, changed=False)
    if not ops:
        log.info("%s: %s@%s is up to date (commit %s), nothing to publish", variant, repo, branch, head[:10])
        return Published(variant, repo, branch, head, changed=False)
    try:
        return _commit(api, manifest, repo, branch, head, ops, remote, stale)
    finally:
        for r in readers:
            r.close()


def _commit(api, manifest: Manifest, repo: str, branch: str, head: str, ops: list, remote: dict,
            stale: list[str]) -> Published:
    from huggingface_hub import CommitOperationAdd

    variant = manifest.variant
    changed = sum(isinstance(o, CommitOperationAdd) for o in ops)
    log.info("%s: publishing to %s@%s: %d files added or changed, %d deleted", variant, repo, branch,
             changed, len(stale))
    own = {*manifest.files, manifest.path_in_repo}
    if not stale and not any(o.path_in_repo in own for o in ops):  # the variant is as published: only its card moved
        message = f"Card: update ({', '.join(sorted(o.path_in_repo for o in ops))}; {variant}'s files unchanged)"
    else:
        message = (f"{variant}: {'add' if not remote.keys() - {'.gitattributes'} else 'update'} "
                   f"({manifest.method}, built by quantpub {manifest.quantpub_version})")
    commit = retry(lambda: api.create_commit(
        repo, operations=ops, revision=branch, parent_commit=head, commit_message=message,
        commit_description=_description(manifest)), f"commit {variant} to {repo}@{branch}")
    return Published(variant, repo, branch, commit.oid, changed=True)


class _CountingReader(io.BufferedReader):
    """A file for ``CommitOperationAdd`` that reports the bytes read from it (the upload's progress)."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self.counter = None

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.counter is not None and data:
            self.counter(len(data))
        return data


def _same(remote, local: LocalFile) -> bool:
    if remote is None or remote.size != local.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256
    return remote.blob_id == (local.git_oid or git_blob_id(local.source))


def _owned_by(path: str, manifest: Manifest) -> bool:
    """A GGUF repo file belongs to this variant if it is one of its files, whole or split, under
    the variant's ``<model>.<TYPE>`` stem (``Qwen2.5-0.5B.Q4_K_M``: a model name may hold "-0")."""
    if path == manifest.path_in_repo:
        return True
    stems = {naming.gguf_stem(name) for name in manifest.files if name.endswith(".gguf")}
    return path.endswith(".gguf") and naming.gguf_stem(path) in stems


def _description(manifest: Manifest) -> str:
    calib = manifest.calibration
    lines = [f"Variant `{manifest.variant}` of `{manifest.model}`.",
             f"Parameters: `{json.dumps(manifest.parameters, sort_keys=True)}`."]
    if calib:
        lines.append(f"Calibration: {calib.source}, {calib.n_samples} x {calib.seq_len} tokens, "
                     f"sha256 {str(calib.sha256)[:16]}.")
    return "\n".join(lines)

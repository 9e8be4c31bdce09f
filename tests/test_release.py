"""
Releasing weights end to end: ``scripts.release build`` on a committed copy of the bundle, its files served by an
HTTP server on 127.0.0.1, and MONAI's own ``download`` and ``download_large_files`` commands fetching them back,
hash-checked; plus the refusals (uncommitted files, a checkpoint that does not fit, tampered downloads).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import monai.bundle.scripts
import pytest
import torch
from bundle_test_utils import CONFIGS, REPO, TINY_NETWORK, inference_parser, randomise_parameters
from monai.apps.utils import HashCheckError
from monai.bundle import download_large_files
from monai.data import load_net_with_metadata

from scripts.networks.ss2d import with_scan_backend
from scripts.release import (
    BUNDLE_NAME,
    LARGE_FILES,
    PACKAGED,
    build,
    build_archive,
    read_large_files,
    verify,
    write_large_files,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("git") is None, reason="a release is built from git-tracked files"),
    # torch.jit is deprecated upstream but is what MONAI's ckpt_export and the zoo's model.ts use
    pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"),
]

VERSION = json.loads((CONFIGS / "metadata.json").read_text())["version"]
ARCHIVE = f"{BUNDLE_NAME}_v{VERSION}.zip"
# a throwaway identity and no signing, for the commits in the temporary copies of the bundle
GIT = ["git", "-c", "user.name=release test", "-c", "user.email=test@127.0.0.1", "-c", "commit.gpgsign=false"]
# urllib would send requests for 127.0.0.1 through a proxy that the environment names
LOCAL_ENV = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}


class _NotWeights:
    """A class that ``torch.load(weights_only=True)`` must refuse to unpickle."""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Keep the request log out of the test output."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(folder: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout


def _bundle_copy(folder: Path) -> Path:
    """A new git repository at ``folder`` with the bundle's files as they are in the working tree, committed."""
    for name in filter(None, _git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree stays deleted
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    _git(folder, "init", "-q")
    _git(folder, "add", "-A")
    _git(folder, "commit", "-q", "-m", "bundle copy")
    return folder


def _tiny_network(**override) -> torch.nn.Module:
    network = inference_parser(**{**TINY_NETWORK, **override}).get_parsed_content("network_def")
    randomise_parameters(network)
    return network.eval()


def _checkpoint(path: Path, **override) -> Path:
    torch.save(_tiny_network(**override).state_dict(), path)
    return path


def _bundle_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in ``cwd``, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env={**os.environ, **LOCAL_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A release of a random tiny checkpoint from a bundle copy, its output folder served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("release")
    bundle = _bundle_copy(root / "bundle")
    # ignored local outputs, which must not reach the archive
    for junk in ("eval/metrics.csv", "data/synthetic/x.png", "scripts/__pycache__/x.cpython-311.pyc"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_text("local output")
    dist = root / "dist"
    dist.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=dist))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/v{VERSION}"
        (dist / f"v{VERSION}").mkdir()
        checkpoint = _checkpoint(root / "trained.pt")
        summary = build(
            checkpoint=str(checkpoint),
            base_url=base_url + "/",
            output_dir=str(dist / f"v{VERSION}"),
            bundle_root=str(bundle),
            **TINY_NETWORK,
        )
        yield SimpleNamespace(
            bundle=bundle, dist=dist / f"v{VERSION}", base_url=base_url, checkpoint=checkpoint, summary=summary
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_build_writes_large_files_with_the_released_hashes(released):
    entries = read_large_files(str(released.bundle))
    assert [e["path"] for e in entries] == ["models/model.pt", "models/model.ts"]
    for entry in entries:
        name = Path(entry["path"]).name
        assert entry["url"] == f"{released.base_url}/{name}"
        assert entry["hash_type"] == "sha256"
        assert entry["hash_val"] == _sha256(released.dist / name)
    assert (released.dist / "model.pt").read_bytes() == released.checkpoint.read_bytes()
    assert (released.bundle / "models" / "model.ts").read_bytes() == (released.dist / "model.ts").read_bytes()
    sums = (released.dist / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{_sha256(released.dist / name)}  {name}" for name in ("model.pt", "model.ts", ARCHIVE)]
    assert all(line in released.summary for line in sums)


def test_exported_torchscript_matches_the_checkpoint(released):
    network = _tiny_network()
    network.load_state_dict(torch.load(released.checkpoint, weights_only=True))
    exported, meta, extra = load_net_with_metadata(
        str(released.dist / "model.ts"), map_location="cpu", more_extra_files=("inference.json",)
    )
    assert meta["version"] == VERSION
    stored = json.loads(extra["inference.json"])
    assert {k: stored[k] for k in TINY_NETWORK} == TINY_NETWORK
    assert stored["bundle_root"] == ".", "the release machine's path leaked into model.ts"
    x = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # TorchScript runs the PyTorch scan. Against the eager CPU kernel only float32 rounding separates them, which
        # the O(1) random parameters amplify: both float32 paths were measured up to 6e-4 away from float64 here.
        torch.testing.assert_close(exported.eval()(x), with_scan_backend(network, "torch")(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(exported.eval()(x), network(x), rtol=1e-3, atol=1e-3)


def test_archive_holds_the_committed_bundle_files(released):
    tracked = _git(released.bundle, "ls-files", "-z", "--", *PACKAGED).split("\0")
    expected = {f"{BUNDLE_NAME}/{name}" for name in tracked if name} | {f"{BUNDLE_NAME}/{LARGE_FILES}"}
    with zipfile.ZipFile(released.dist / ARCHIVE) as archive:
        names = set(archive.namelist())
        assert names == expected
        assert archive.read(f"{BUNDLE_NAME}/{LARGE_FILES}") == (released.bundle / LARGE_FILES).read_bytes()
    for member in ("configs/metadata.json", "configs/inference.json", "scripts/networks/vmaml_unet.py", "LICENSE"):
        assert f"{BUNDLE_NAME}/{member}" in names
    assert not any(re.match(rf"{BUNDLE_NAME}/(tests|models|eval|data)/", n) or ".pyc" in n for n in names)


def test_download_installs_the_archive_and_its_weights(released, tmp_path):
    url = f"{released.base_url}/{ARCHIVE}"
    args = ["download", "--name", BUNDLE_NAME, "--version", VERSION, "--url", url, "--bundle_dir", str(tmp_path)]
    result = _bundle_cli(*args, "--progress", "False", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = tmp_path / BUNDLE_NAME
    assert json.loads((installed / "configs" / "metadata.json").read_text())["version"] == VERSION
    assert not (installed / "models" / "model.pt").exists(), "the weights come through large_files.yml"

    result = _bundle_cli("download_large_files", "--bundle_path", str(installed), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("model.pt", "model.ts"):
        assert _sha256(installed / "models" / name) == _sha256(released.dist / name)


def test_download_large_files_refuses_a_tampered_file(released, tmp_path):
    tampered = released.dist / "tampered"
    tampered.mkdir()
    data = bytearray((released.dist / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.pt").write_bytes(bytes(data))
    entry = dict(read_large_files(str(released.bundle))[0], url=f"{released.base_url}/tampered/model.pt")
    bundle = tmp_path / "bundle"
    write_large_files(str(bundle / LARGE_FILES), [entry])

    result = _bundle_cli("download_large_files", "--bundle_path", str(bundle), cwd=tmp_path)
    assert result.returncode != 0
    assert "hash check of downloaded file failed" in result.stdout + result.stderr
    assert sorted(p.name for p in bundle.rglob("*")) == [LARGE_FILES], "a refused download left a file behind"


def test_verify_downloads_and_checks_every_file(released, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert verify(str(released.bundle)).startswith("2 file(s)")

    entry = dict(read_large_files(str(released.bundle))[1], hash_val="0" * 64)
    write_large_files(str(tmp_path / LARGE_FILES), [entry])
    with pytest.raises(HashCheckError, match="models/model.ts"):
        verify(str(tmp_path))
    write_large_files(str(tmp_path / LARGE_FILES), [dict(entry, hash_val="")])
    with pytest.raises(ValueError, match="has no hash_val"):
        verify(str(tmp_path))


def test_build_refuses_uncommitted_files(tmp_path):
    bundle = _bundle_copy(tmp_path / "bundle")
    (bundle / "scripts" / "uncommitted.py").write_text("VALUE = 1\n")
    large_files = (bundle / LARGE_FILES).read_bytes()
    with pytest.raises(ValueError, match="scripts/uncommitted.py"):
        build(
            checkpoint=str(_checkpoint(tmp_path / "model.pt")),
            base_url="http://127.0.0.1:9/release",
            output_dir=str(tmp_path / "dist"),
            bundle_root=str(bundle),
            **TINY_NETWORK,
        )
    assert (bundle / LARGE_FILES).read_bytes() == large_files
    assert not (tmp_path / "dist").exists() and not (bundle / "models" / "model.ts").exists()


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda path: _checkpoint(path, d_state=8), "does not fit the inference config's network"),
        (lambda path: torch.save({"model": _NotWeights()}, path), r"weights_only=True\) refuses it"),
        (lambda path: path.write_bytes(b"not a checkpoint"), r"weights_only=True\) refuses it"),
        (lambda path: torch.save([torch.zeros(1)], path), "expected a state dict"),
    ],
    ids=["other-network", "not-weights-only", "corrupt", "not-a-state-dict"],
)
def test_build_refuses_a_bad_checkpoint_and_writes_nothing(tmp_path, write, match):
    bundle = _bundle_copy(tmp_path / "bundle")
    large_files = (bundle / LARGE_FILES).read_bytes()
    checkpoint = tmp_path / "model.pt"
    write(checkpoint)
    with pytest.raises(ValueError, match=match) as error:
        build(
            checkpoint=str(checkpoint),
            base_url="http://127.0.0.1:9/release",
            output_dir=str(tmp_path / "dist"),
            bundle_root=str(bundle),
            **TINY_NETWORK,
        )
    assert str(checkpoint) in str(error.value)
    assert (bundle / LARGE_FILES).read_bytes() == large_files
    assert not (tmp_path / "dist").exists() and not (bundle / "models" / "model.ts").exists()


def test_committed_large_files_lists_only_complete_entries(tmp_path, monkeypatch):
    """
    The committed ``large_files.yml`` reads as MONAI reads it, and every entry has a sha256 hash, so no download
    goes unchecked; ``download_large_files`` asks for exactly its entries (an empty list: nothing, and no error).
    Whether a real file backs each hash needs the network: ``python -m scripts.release verify`` checks that.
    """
    entries = read_large_files(str(REPO))
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        assert entry["path"].startswith("models/") and entry["url"].startswith("https://")
        assert entry["hash_type"] == "sha256" and re.fullmatch("[0-9a-f]{64}", entry["hash_val"])
    shutil.copy(REPO / LARGE_FILES, tmp_path / LARGE_FILES)
    requested = []
    monkeypatch.setattr(monai.bundle.scripts, "download_url", lambda **kwargs: requested.append(kwargs))
    download_large_files(bundle_path=str(tmp_path))
    assert requested == [
        {"url": e["url"], "hash_val": e["hash_val"], "hash_type": e["hash_type"], "filepath": str(tmp_path / e["path"])}
        for e in entries
    ]


def test_archive_is_reproducible(tmp_path):
    for name, text in {"configs/a.json": "{}\n", "LICENSE": "text\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    build_archive(str(tmp_path), ["LICENSE", "configs/a.json"], str(tmp_path / "first.zip"))
    os.utime(tmp_path / "LICENSE", (0, 0))
    build_archive(str(tmp_path), ["configs/a.json", "LICENSE"], str(tmp_path / "second.zip"))
    assert (tmp_path / "first.zip").read_bytes() == (tmp_path / "second.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "first.zip") as archive:
        assert archive.namelist() == [f"{BUNDLE_NAME}/LICENSE", f"{BUNDLE_NAME}/configs/a.json"]

"""
Release trained weights: TorchScript export, sha256 hashes, ``large_files.yml`` and the bundle archive.

``build`` checks that a checkpoint loads with ``torch.load(weights_only=True)`` into the inference config's network,
exports ``models/model.ts`` (checked against the eager network), writes ``large_files.yml`` at the bundle root with
the URLs of ``model.pt`` and ``model.ts`` under ``base_url`` and their sha256 hashes, and writes to ``output_dir``
what is to be uploaded under ``base_url``: ``model.pt``, ``model.ts``, ``vmaml_unet_v<version>.zip`` (a
``vmaml_unet/`` folder of the committed bundle files plus ``large_files.yml``, as ``monai.bundle download``
installs it) and ``SHA256SUMS``. ``verify`` downloads every file that ``large_files.yml`` lists into a temporary
folder and checks its hash, which confirms an upload before ``large_files.yml`` is committed.

Command line (``python -m scripts.release build|verify [options]``)::

    python -m scripts.release build --checkpoint models/model.pt \
        --base_url https://github.com/OWNER/REPO/releases/download/v0.1.0
    python -m scripts.release verify
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.apps.utils import HashCheckError, download_url
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata
from monai.utils import ensure_tuple

from scripts.atomic_file import atomic_write
from scripts.networks.ss2d import with_scan_backend

__all__ = [
    "BUNDLE_NAME",
    "LARGE_FILES",
    "PACKAGED",
    "sha256",
    "packaged_files",
    "load_network",
    "export_torchscript",
    "write_large_files",
    "read_large_files",
    "build_archive",
    "build",
    "verify",
]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "vmaml_unet"
LARGE_FILES = "large_files.yml"
# what the archive ships: what running the bundle needs; tests and developer tooling stay in the repository, and
# the weights are fetched through large_files.yml so that every copy of them is hash-checked
PACKAGED = ("configs", "scripts", "docs", "LICENSE", "README.md", "requirements.txt")
# a fixed timestamp for every archive member, so that the same files always give the same archive and hash
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
EXPORT_TOLERANCE = 1e-4


def sha256(path: str) -> str:
    """The sha256 hex digest of the file at ``path``, the hash ``monai.apps.utils.check_hash`` compares."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_files(bundle_root: str) -> list[str]:
    """
    The committed files under :data:`PACKAGED`, relative to ``bundle_root`` and sorted.

    Raises:
        FileNotFoundError: when git is not installed.
        ValueError: when ``bundle_root`` is not in a git work tree, or when a packaged path has uncommitted changes
            or untracked files: the archive would ship unreviewed content or miss a file.
    """
    if shutil.which("git") is None:
        raise FileNotFoundError("git is needed: the archive is built from the files git tracks")

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", bundle_root, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"{bundle_root}: `git {' '.join(args)}` failed: {result.stderr.strip()}")
        return result.stdout

    changes = git("status", "--porcelain", "--untracked-files=all", "--", *PACKAGED)
    if changes.strip():
        raise ValueError(
            f"{bundle_root}: the archive holds committed files only; commit or remove these changes first:\n{changes}"
        )
    return sorted(name for name in git("ls-files", "-z", "--", *PACKAGED).split("\0") if name)


def load_network(parser: ConfigParser, checkpoint: str) -> torch.nn.Module:
    """
    The parser's ``network_def`` in eval mode, on the CPU, with the weights of ``checkpoint``.

    Args:
        parser: the inference config, with any overrides (network sizes) applied.
        checkpoint: a state dict (parameter name -> tensor) saved by ``torch.save``, as ``CheckpointSaver`` writes
            it for one network.

    Raises:
        FileNotFoundError: when ``checkpoint`` is not a file.
        ValueError: when ``torch.load(weights_only=True)`` refuses it, it is not a state dict, or it does not fit
            the network (the message names the file and the mismatched parameters).
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} is not a file")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{checkpoint}: torch.load(weights_only=True) refuses it: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{checkpoint} does not fit the inference config's network; pass the sizes it was trained with "
            f"(--config_file or keys such as --network_dims): {error}"
        ) from error
    return network.eval()


def export_torchscript(network: torch.nn.Module, parser: ConfigParser, config: Mapping[str, Any]) -> bytes:
    """
    ``network`` scripted with ``torch.jit.script`` and saved as ``monai.bundle ckpt_export`` saves it.

    The archive holds ``metadata.json`` (the parser's ``_meta_``) and ``inference.json`` (``config``, the inference
    config with its overrides, which MONAI Deploy reads from the TorchScript file).

    Args:
        network: the eager network in eval mode.
        parser: the inference config; ``in_channels`` and ``image_size`` give the shape of the check input.
        config: the config to store as ``inference.json``.

    Raises:
        RuntimeError: when the saved TorchScript network's output differs from the eager one by more than
            :data:`EXPORT_TOLERANCE` (relative and absolute) on a random ``(1, in_channels, *image_size)`` input.
            The eager network is run with the PyTorch scan, the one TorchScript runs, so that the check sees
            scripting errors rather than the rounding differences of the CPU kernel.
    """
    buffer = io.BytesIO()
    # torch.jit is deprecated upstream, but TorchScript is the model.ts format MONAI's ckpt_export and Deploy use
    save_net_with_metadata(
        torch.jit.script(network),
        buffer,
        include_config_vals=False,
        append_timestamp=False,
        meta_values=parser.get("_meta_"),
        more_extra_files={"inference.json": json.dumps(config).encode()},
    )
    buffer.seek(0)
    exported = torch.jit.load(buffer, map_location="cpu").eval()
    shape = (1, parser.get_parsed_content("in_channels"), *parser.get_parsed_content("image_size"))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = with_scan_backend(network, "torch")(x), exported(x)
    try:
        torch.testing.assert_close(actual, expected, rtol=EXPORT_TOLERANCE, atol=EXPORT_TOLERANCE)
    except AssertionError as error:
        raise RuntimeError(f"the TorchScript network's output differs from the eager network's: {error}") from error
    return buffer.getvalue()


def write_large_files(path: str, entries: Sequence[Mapping[str, str]]) -> None:
    """
    Write ``entries`` (``path``, ``url``, ``hash_val``, ``hash_type``) as the ``large_files`` list of the YAML file
    ``path`` that ``monai.bundle download_large_files`` reads. Values are written as JSON strings, valid YAML.
    """
    lines = [
        "# Written by `python -m scripts.release build`: the released weights, their URLs and sha256 hashes.",
        "# `python -m monai.bundle download_large_files --bundle_path .` fetches them and refuses a file whose",
        "# hash differs. See docs/release.md.",
        "large_files:",
    ]
    for entry in entries:
        fields = [f"{key}: {json.dumps(entry[key])}" for key in ("path", "url", "hash_val", "hash_type")]
        lines += [f"  - {fields[0]}", *(f"    {field}" for field in fields[1:])]
    with atomic_write(path) as stream:
        stream.write(("\n".join(lines) + "\n").encode())


def read_large_files(bundle_root: str) -> list[dict]:
    """
    The ``large_files`` list of ``bundle_root/large_files.yml``, read as ``monai.bundle download_large_files`` reads it.

    Raises:
        ValueError: when the file has no ``large_files`` list.
    """
    path = os.path.join(bundle_root, LARGE_FILES)
    entries = ConfigParser.load_config_file(path).get("large_files")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a `large_files` list, got {entries!r}")
    return entries


def build_archive(bundle_root: str, files: Sequence[str], path: str) -> None:
    """
    Write the zip archive ``path`` holding ``files`` (relative to ``bundle_root``) under a ``vmaml_unet/`` folder.

    That is the layout ``monai.bundle download`` extracts (``has_base=True``) into ``<bundle_dir>/vmaml_unet``.
    Members are sorted and carry a fixed timestamp, so the same files give a byte-identical archive.
    """
    with atomic_write(path) as stream, zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            member = zipfile.ZipInfo(f"{BUNDLE_NAME}/{name}", date_time=ZIP_DATE_TIME)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            with open(os.path.join(bundle_root, name), "rb") as source:
                archive.writestr(member, source.read())


def _copy(source: str, destination: str) -> None:
    """Copy the file ``source`` onto ``destination`` atomically."""
    with open(source, "rb") as reader, atomic_write(destination) as writer:
        shutil.copyfileobj(reader, writer)


def build(
    checkpoint: str = "models/model.pt",
    base_url: str = "",
    output_dir: str = "dist",
    bundle_root: str = ".",
    config_file: str | Sequence[str] | None = None,
    **override: Any,
) -> str:
    """
    Release ``checkpoint``: write ``models/model.ts`` and ``large_files.yml`` in ``bundle_root``, and ``model.pt``,
    ``model.ts``, ``vmaml_unet_v<version>.zip`` and ``SHA256SUMS`` in ``output_dir``, to be uploaded under
    ``base_url``. Every file is written atomically; nothing is written until the checkpoint loads and exports.

    Args:
        checkpoint: the trained network's state dict.
        base_url: the http(s) URL the files of ``output_dir`` will be downloadable under (e.g. a GitHub release's
            ``https://github.com/OWNER/REPO/releases/download/TAG``).
        output_dir: where the files to upload are written.
        bundle_root: the bundle, a git work tree without uncommitted changes in the packaged files.
        config_file: the inference config file(s) the network is built from; default
            ``<bundle_root>/configs/inference.json``. A list merges files in order.
        override: config keys to override, e.g. ``--network_dims "[48,96,192,384]"``.

    Returns:
        a summary: the files written and their sha256, for the release notes.
    """
    if not base_url.startswith(("https://", "http://")):
        raise ValueError(f"--base_url must be an http(s) URL, got {base_url!r}")
    base_url = base_url.rstrip("/")
    bundle_root = os.path.abspath(bundle_root)
    config_files = list(ensure_tuple(config_file or os.path.join(bundle_root, "configs", "inference.json")))

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(override)
    config = {k: copy.deepcopy(v) for k, v in parser.get().items() if k != "_meta_"}
    parser.read_meta(os.path.join(bundle_root, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_root
    version = parser.get("_meta_#version")

    files = packaged_files(bundle_root)
    network = load_network(parser, checkpoint)
    torchscript = export_torchscript(network, parser, config)

    with atomic_write(os.path.join(bundle_root, "models", "model.ts")) as stream:
        stream.write(torchscript)
    released = {"model.pt": checkpoint, "model.ts": os.path.join(bundle_root, "models", "model.ts")}
    for name, source in released.items():
        _copy(source, os.path.join(output_dir, name))
    entries = [
        {
            "path": f"models/{name}",
            "url": f"{base_url}/{name}",
            "hash_val": sha256(os.path.join(output_dir, name)),
            "hash_type": "sha256",
        }
        for name in released
    ]
    write_large_files(os.path.join(bundle_root, LARGE_FILES), entries)
    archive_name = f"{BUNDLE_NAME}_v{version}.zip"
    build_archive(bundle_root, [*files, LARGE_FILES], os.path.join(output_dir, archive_name))

    sums = "".join(f"{sha256(os.path.join(output_dir, name))}  {name}\n" for name in [*released, archive_name])
    with atomic_write(os.path.join(output_dir, "SHA256SUMS")) as stream:
        stream.write(sums.encode())
    logger.info(f"wrote {os.path.join(bundle_root, LARGE_FILES)} and models/model.ts in {bundle_root}")
    return f"upload the files of {os.path.abspath(output_dir)} to {base_url}/:\n{sums}"


def verify(bundle_root: str = ".") -> str:
    """
    Download every file that ``<bundle_root>/large_files.yml`` lists into a temporary folder and check its hash.

    Run it after uploading a release and before committing ``large_files.yml``: it fetches from the URLs even when
    the files are present locally (``download_large_files`` would only check the local copies then).

    Raises:
        ValueError: for an entry without ``hash_val``, whose download nothing would check.
        HashCheckError: naming the entry, when a downloaded file's hash differs.
    """
    entries = read_large_files(bundle_root)
    with tempfile.TemporaryDirectory() as folder:
        for index, entry in enumerate(entries):
            if not entry.get("hash_val"):
                raise ValueError(f"{LARGE_FILES}: entry {entry.get('path')!r} has no hash_val")
            try:
                download_url(
                    url=entry["url"],
                    filepath=os.path.join(folder, str(index), os.path.basename(entry["path"])),
                    hash_val=entry["hash_val"],
                    hash_type=entry.get("hash_type", "sha256"),
                    progress=False,
                )
            except HashCheckError as error:
                raise HashCheckError(f"{LARGE_FILES}: entry {entry['path']!r}: {error}") from error
    return f"{len(entries)} file(s) of {os.path.join(bundle_root, LARGE_FILES)} downloaded and match their hashes"


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire({"build": build, "verify": verify})
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")

"""A Hugging Face Hub cache on disk, laid out as ``huggingface_hub`` lays out what it downloads.

No test reaches the Hub (these machines have no network but the package registries). What a download
leaves behind is written here instead, in the layout huggingface_hub documents and reads
(https://huggingface.co/docs/huggingface_hub/guides/manage-cache)::

    <cache>/models--<namespace>--<name>/
        blobs/<etag>                      file contents, by the Hub's ETag (sha256 for LFS files, git sha1 else)
        snapshots/<commit>/<path>         relative symlinks into blobs/
        refs/<branch or tag>              the commit that revision pointed to when downloaded

:func:`check_layout` has huggingface_hub's own cache scanner read it back, so a layout the library would
not recognise fails the test that wrote it; the pulls themselves go through ``snapshot_download``.

:class:`HubErrorEndpoint` is an emulation of the Hub's HTTP error replies (a status code and the
``X-Error-Code`` header, as the Hub sends them), so that huggingface_hub's real error handling runs for a
repository that does not exist, a private or gated one, or a revision that does not exist. It serves no
files and accepts no upload: nothing in the tests presents it as the Hub.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.file_download import repo_folder_name

LFS_SUFFIXES = (".safetensors", ".bin")


def _etag(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def commit_id(files: Mapping[str, bytes], salt: str = "") -> str:
    """A 40-hex commit id that depends on the files (as a real one would)."""
    digest = hashlib.sha1(salt.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return digest.hexdigest()


def add_revision(
    cache: Path, repo_id: str, files: Mapping[str, bytes], refs: tuple[str, ...] = ("main",), salt: str = ""
) -> str:
    """Put ``files`` (path in repo -> content) into ``cache`` as one commit of ``repo_id`` that ``refs`` point
    to; returns the commit id."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = commit_id(files, salt)
    for name, data in files.items():
        blob = storage / "blobs" / _etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """The files of ``folder``, keyed by their path in a repository (under ``prefix``)."""
    return {f"{prefix}{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_layout(cache: Path, repo_id: str) -> set[str]:
    """huggingface_hub's scan of ``cache``: it must find ``repo_id`` without complaint; returns its refs."""
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    return {ref for revision in repo.revisions for ref in revision.refs}


class _Handler(BaseHTTPRequestHandler):
    replies: dict[str, tuple[int, dict[str, str]]] = {}

    def _reply(self) -> None:
        status, headers = next(
            (reply for prefix, reply in self.replies.items() if self.path.startswith(prefix)),
            (404, {"X-Error-Code": "RepoNotFound"}),
        )
        body = b'{"error": "emulated"}'
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _reply

    def log_message(self, *args: object) -> None:
        pass


class HubErrorEndpoint:
    """An emulation of the Hub's error replies on localhost; :attr:`url` is the endpoint to set."""

    def __init__(self, replies: dict[str, tuple[int, dict[str, str]]]) -> None:
        handler = type("Handler", (_Handler,), {"replies": replies})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve in a thread while the block runs; yields :attr:`url`."""
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self.url
        finally:
            self.server.shutdown()
            self.server.server_close()

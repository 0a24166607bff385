"""Choose the modules a delta modifies on a web page: ``LoraModel(model, interactive_modify=True)``.

The delta's constructor serves a page on ``http://127.0.0.1:PORT/`` (a free port for ``True``, the
given port for an int), prints its address and waits. The page shows the backbone's folded module
tree (:meth:`~opendelta_dist.visualization.Visualization.folded_tree`): a run of identical blocks
(``layer.0-11``) is one node, and a module selected under it is selected in every block of the run;
the run's "each block" button shows its blocks one by one, to select in single blocks. "Submit"
sends the selected module names back, the server stops, and the delta is built on those names as if
they had been passed as ``modified_modules``: ``exclude_modules`` and the method's own checks apply,
and the saved config holds the names, so ``from_finetuned`` rebuilds the delta without a page.

The server listens on 127.0.0.1 only; from another machine, forward the port first
(``ssh -L PORT:127.0.0.1:PORT host``). It waits without limit unless the environment variable
``OPENDELTA_DIST_INTERACTIVE_TIMEOUT`` gives one, in seconds.
"""

from __future__ import annotations

import errno
import html
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from torch import nn

from opendelta_dist.addressing import REGEX_PREFIX, named_backbone_modules
from opendelta_dist.errors import DeltaConfigError, InteractiveTimeoutError
from opendelta_dist.visualization import Visualization

TIMEOUT_ENV = "OPENDELTA_DIST_INTERACTIVE_TIMEOUT"
HOST = "127.0.0.1"
_LOCAL_HOSTNAMES = frozenset({"127.0.0.1", "localhost"})
# a submit is a list of module names; anything much larger is not from the page
_MAX_BODY = 16 * 1024 * 1024


def modules_from_browser(backbone: nn.Module, interactive_modify: bool | int, delta_name: str = "delta") -> list[str]:
    """The module keys chosen on the page, for ``DeltaBase(interactive_modify=...)``.

    Args:
        backbone: the model whose modules are chosen.
        interactive_modify: True to serve on a free port, or the port number.
        delta_name: what the page's title says the modules are for (e.g. ``"LoraModel"``).

    Returns:
        Module keys selecting exactly the chosen modules (see :func:`exact_keys`), in the
        backbone's order.

    Raises:
        DeltaConfigError: ``interactive_modify`` or the timeout variable is invalid, or the port is busy.
        InteractiveTimeoutError: nothing was submitted within ``OPENDELTA_DIST_INTERACTIVE_TIMEOUT`` seconds.
    """
    timeout = _timeout_from_env()
    names = choose_modules(backbone, port=_port(interactive_modify), timeout=timeout, title=delta_name)
    return exact_keys(backbone, names)


def choose_modules(backbone: nn.Module, port: int = 0, timeout: float | None = None, title: str = "delta") -> list[str]:
    """Serve the module-choosing page on 127.0.0.1, wait for its submit and return the chosen names.

    Args:
        backbone: the model whose modules are chosen.
        port: the port to listen on; 0 for a free one.
        timeout: seconds to wait for the submit; None to wait without limit.
        title: what the page's title says the modules are for.

    Returns:
        The dotted names of the chosen modules, in the backbone's order (at least one).

    Raises:
        DeltaConfigError: the port is in use or cannot be opened.
        InteractiveTimeoutError: nothing was submitted within ``timeout`` seconds.
    """
    order = {name: i for i, (name, _) in enumerate(named_backbone_modules(backbone)) if name}
    server = _ChoiceServer(_page(backbone, title), order, port)
    serving = threading.Thread(target=server.serve_forever, name="opendelta-interactive-modify", daemon=True)
    serving.start()
    url = f"http://{HOST}:{server.server_port}/"
    limit = "" if timeout is None else f" (for {timeout:g} s)"
    try:
        print(
            f"interactive_modify: open {url} in a browser to choose the modules {title} modifies; waiting for "
            f"its submit{limit}.\n  From another machine, forward the port first: "
            f"ssh -L {server.server_port}:{HOST}:{server.server_port} <this host>",
            flush=True,
        )
        if not server.submitted.wait(timeout):
            raise InteractiveTimeoutError(
                f"no module selection was submitted at {url} within {timeout:g} s, and the page was closed. "
                f"Run again and submit in time, raise or unset {TIMEOUT_ENV} (seconds), "
                "or pass modified_modules=[...] instead of interactive_modify."
            )
        return list(server.names)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()


def exact_keys(backbone: nn.Module, names: Sequence[str]) -> list[str]:
    """Module keys that select exactly the modules ``names`` (see :mod:`~opendelta_dist.addressing`).

    A plain key selects every module whose name ends with it, so a full name that is also the
    dotted tail of another name (``"0"`` and ``"1.0"``) becomes a regex anchored at the start of the
    name (``"[r]^0"``); any other name is its own key.

    Args:
        backbone: the model the names belong to.
        names: full dotted module names.

    Returns:
        One key per name, in order.
    """
    tails = set()
    for name, _ in named_backbone_modules(backbone):
        parts = name.split(".")
        tails.update(".".join(parts[i:]) for i in range(1, len(parts)))
    return [f"{REGEX_PREFIX}^{re.escape(name)}" if name in tails else name for name in names]


def _port(interactive_modify: bool | int) -> int:
    if interactive_modify is True:
        return 0
    if isinstance(interactive_modify, bool) or not isinstance(interactive_modify, int):
        raise DeltaConfigError(
            f"interactive_modify must be True (serve on a free port) or a port number, not {interactive_modify!r}"
        )
    if not 1 <= interactive_modify <= 65535:
        raise DeltaConfigError(
            f"interactive_modify={interactive_modify} is not a port number (1-65535); pass True to use a free port"
        )
    return interactive_modify


def _timeout_from_env() -> float | None:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise DeltaConfigError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 600, "
            "or unset it to wait for the page without limit"
        )
    return timeout


def _page(backbone: nn.Module, title: str) -> bytes:
    tree = asdict(Visualization(backbone).folded_tree(rootname=type(backbone).__name__))
    # inside <script>, "</script>" or "<!--" in a module name must not end the script
    data = json.dumps(tree).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__TREE__", data).encode()


class _ChoiceServer(ThreadingHTTPServer):
    """The page's server: holds the page, checks a submit and keeps the chosen names."""

    # a port left by an earlier page (in TIME_WAIT) can be reused, but never shared with a live server
    allow_reuse_address = True
    allow_reuse_port = False
    # a browser may keep idle connections open: they must not keep the server from closing
    daemon_threads = True
    block_on_close = False

    def __init__(self, page: bytes, order: dict[str, int], port: int) -> None:
        self.page = page
        self.order = order
        self.names: list[str] = []
        self.submitted = threading.Event()
        self._lock = threading.Lock()
        try:
            super().__init__((HOST, port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DeltaConfigError(
                    f"interactive_modify cannot serve its page: port {port} on {HOST} is in use (by another "
                    "program, or another interactive_modify page still waiting). Pass interactive_modify=True "
                    f"to use a free port, pass another port number, or stop what listens on port {port}."
                ) from exc
            raise DeltaConfigError(
                f"interactive_modify cannot listen on {HOST}:{port}: {exc.strerror or exc}. Pass "
                "interactive_modify=True to use a free port, or a port number above 1023."
            ) from exc

    def accept(self, names: Any) -> tuple[int, str]:
        """Check a submitted selection and keep it; returns the HTTP status and a message."""
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return 400, 'the submit must be JSON {"names": [module names]}'
        if not names:
            return 400, "nothing is selected: select at least one module, then submit"
        unknown = sorted({n for n in names if n not in self.order})
        if unknown:
            return 400, f"the backbone has no modules named {unknown[:5]}; reload the page and select again"
        with self._lock:
            if self.names:
                return 409, "a selection was submitted already"
            self.names = sorted(set(names), key=self.order.__getitem__)
        return 200, f"{len(self.names)} modules"


class _Handler(BaseHTTPRequestHandler):
    server: _ChoiceServer
    # an idle connection gives up its thread after this many seconds
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        """Say nothing per request: the user's output is theirs."""

    def do_GET(self) -> None:
        """The page."""
        if not self._local_host():
            return
        if urlsplit(self.path).path != "/":
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def do_POST(self) -> None:
        """A submit: ``{"names": [...]}``; answers ``{"count": n}`` or ``{"error": message}``."""
        if not self._local_host():
            return
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            self._json(403, {"error": "a submit must come from the page itself"})
            return
        if urlsplit(self.path).path != "/submit":
            self._json(404, {"error": "not found"})
            return
        # a cross-site form cannot send JSON without asking first (CORS), which this server never allows
        if self.headers.get_content_type() != "application/json":
            self._json(415, {"error": "a submit must be application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= _MAX_BODY:
            self._json(400, {"error": "a submit needs a JSON body"})
            return
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._json(400, {"error": "the submit is not valid JSON"})
            return
        status, message = self.server.accept(body.get("names") if isinstance(body, dict) else None)
        if status != 200:
            self._json(status, {"error": message})
            return
        try:
            self._json(200, {"count": len(self.server.names)})
        finally:
            # the answer is out (or the page is gone): the waiting constructor may stop the server
            self.server.submitted.set()

    def _local_host(self) -> bool:
        # a page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) is refused
        hostname = urlsplit(f"//{self.headers.get('Host', '')}").hostname
        if hostname in _LOCAL_HOSTNAMES:
            return True
        refusal = f"open the page as http://{HOST}:{self.server.server_port}/"
        if self.command == "POST":
            self._json(403, {"error": refusal})
        else:
            self._send(403, f"{refusal}\n".encode(), "text/plain; charset=utf-8")
        return False

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__: choose the modules to modify</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; }
header { padding: 12px 20px; border-bottom: 1px solid #ddd; }
h1 { font-size: 18px; margin: 0 0 4px; }
header p { margin: 0; color: #555; max-width: 60em; }
main { padding: 8px 20px 160px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
ul { list-style: none; margin: 0; padding-left: 22px; }
main > ul { padding-left: 0; }
.row { display: flex; gap: 6px; align-items: baseline; padding: 1px 0; white-space: nowrap; }
.twisty { display: inline-block; width: 1em; cursor: pointer; user-select: none; color: #666; }
.name { padding: 0 4px; border: 1px solid transparent; border-radius: 3px; }
.name[role=checkbox] { cursor: pointer; }
.name[role=checkbox]:hover, .name[role=checkbox]:focus { border-color: #888; outline: none; }
.name[aria-checked=true] { background: #1f7a3a; color: #fff; }
.name[aria-checked=mixed] { background: #cfe9d7; }
.cls { color: #555; }
.params { color: #999; font-size: 12px; }
.delta .name { color: #999; font-style: italic; }
button.split { font-size: 11px; padding: 0 6px; }
footer { position: fixed; bottom: 0; left: 0; right: 0; padding: 10px 20px; background: #f5f5f5;
         border-top: 1px solid #ccc; }
footer pre { max-height: 8em; overflow: auto; margin: 4px 0 0; }
#message { margin-top: 4px; min-height: 1.4em; }
#message.error { color: #b00020; }
#message.done { color: #1f7a3a; font-weight: bold; }
body.done main { opacity: .5; pointer-events: none; }
</style>
</head>
<body>
<header>
<h1>__TITLE__: choose the modules to modify</h1>
<p>Click a module to select it, click again to unselect. A run of identical blocks, such as
<code>0-11</code>, is drawn once: a module selected under it is selected in every block of the run.
Its &ldquo;each block&rdquo; button shows the blocks one by one, to select in single blocks.</p>
</header>
<main id="tree"></main>
<footer>
<button id="submit" type="button">Submit</button>
<button id="clear" type="button">Clear</button>
<span id="count"></span>
<div id="message" role="status"></div>
<details><summary>Selected module names</summary><pre id="names"></pre></details>
</footer>
<script>
"use strict";
const TREE = __TREE__;
const selected = new Set();   // dotted module names
const split = new Set();      // paths of runs drawn block by block
const collapsed = new Set();  // paths of nodes whose children are hidden
let done = false;

function join(prefix, name) { return prefix ? prefix + "." + name : name; }

// the modules a drawn node stands for: one per block of every run on its path
function namesOf(prefixes, node) {
  const out = [];
  for (const p of prefixes) for (const n of node.names) out.push(join(p, n));
  return out;
}

function stateOf(names) {
  let n = 0;
  for (const name of names) if (selected.has(name)) n++;
  return n === 0 ? "false" : n === names.length ? "true" : "mixed";
}

function toggle(names) {
  if (done) return;
  const on = stateOf(names) !== "true";
  for (const name of names) on ? selected.add(name) : selected.delete(name);
  say("", "");
  render();
}

function flip(set, key) { set.has(key) ? set.delete(key) : set.add(key); render(); }

function span(cls, text) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

function drawNode(node, prefixes, parentPath, ul) {
  const path = join(parentPath, node.label);
  const names = namesOf(prefixes, node);
  const isRun = node.names.length > 1;
  const li = document.createElement("li");
  const row = document.createElement("div");
  row.className = node.delta ? "row delta" : "row";
  row.dataset.path = path;
  const twisty = span("twisty", node.children.length ? (collapsed.has(path) ? "\\u25b8" : "\\u25be") : "");
  if (node.children.length) twisty.onclick = () => flip(collapsed, path);
  const label = span("name", node.label);
  if (!node.delta) {
    label.setAttribute("role", "checkbox");
    label.setAttribute("aria-checked", stateOf(names));
    label.tabIndex = 0;
    label.title = names.length > 1 ? names.length + " modules: " + names.join(", ") : names[0];
    label.onclick = () => toggle(names);
    label.onkeydown = (e) => {
      if (e.key === " " || e.key === "Enter") { e.preventDefault(); toggle(names); }
    };
  }
  row.append(twisty, label, span("cls", "(" + node.class_name + ")" + (node.delta ? " delta" : "")));
  if (node.params.length) row.append(span("params", node.params.join(" ")));
  if (isRun) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "split";
    button.textContent = split.has(path) ? "fold blocks" : "each block (" + node.names.length + ")";
    button.onclick = () => flip(split, path);
    row.append(button);
  }
  li.append(row);
  if (!collapsed.has(path)) {
    const sub = document.createElement("ul");
    if (isRun && split.has(path)) {
      for (const n of node.names) drawNode({...node, label: n, names: [n]}, prefixes, parentPath, sub);
    } else {
      for (const child of node.children) drawNode(child, names, path, sub);
    }
    if (sub.childElementCount) li.append(sub);
  }
  ul.append(li);
}

function sortedSelection() {
  return Array.from(selected).sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
}

function render() {
  const focused = document.activeElement && document.activeElement.closest(".row");
  const focusPath = focused ? focused.dataset.path : null;
  const ul = document.createElement("ul");
  const li = document.createElement("li");
  const row = document.createElement("div");
  row.className = "row";
  row.append(span("name", TREE.label), span("cls", "(" + TREE.class_name + ")"));
  if (TREE.params.length) row.append(span("params", TREE.params.join(" ")));
  const sub = document.createElement("ul");
  for (const child of TREE.children) drawNode(child, [""], "", sub);
  li.append(row, sub);
  ul.append(li);
  document.getElementById("tree").replaceChildren(ul);
  document.getElementById("count").textContent =
    selected.size + (selected.size === 1 ? " module selected" : " modules selected");
  document.getElementById("names").textContent = sortedSelection().join("\\n");
  if (focusPath !== null) {
    const again = document.querySelector('.row[data-path="' + CSS.escape(focusPath) + '"] .name[role=checkbox]');
    if (again) again.focus();
  }
}

function say(text, kind) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = kind;
}

async function submit() {
  if (done) return;
  if (selected.size === 0) {
    say("Nothing is selected: click the modules the delta should modify, then submit.", "error");
    return;
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  say("Sending the selection to Python\\u2026", "");
  let response, body;
  try {
    response = await fetch("/submit", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({names: sortedSelection()}),
    });
    body = await response.json();
  } catch (err) {
    say("Python did not answer (did it stop, or time out?): " + err, "error");
    button.disabled = false;
    return;
  }
  if (!response.ok) {
    say("Not accepted: " + (body.error || "HTTP " + response.status), "error");
    button.disabled = false;
    return;
  }
  done = true;
  document.body.classList.add("done");
  document.getElementById("clear").disabled = true;
  say("Done: " + body.count + " modules sent to Python, which builds the delta on them. " +
      "The server has stopped; this page can be closed.", "done");
}

document.getElementById("submit").onclick = submit;
document.getElementById("clear").onclick = () => { selected.clear(); say("", ""); render(); };
render();
</script>
</body>
</html>
"""

"""``/openapi.json`` and ``/docs``: the HTTP door described, as JSON and as a page that needs no internet.

Both are public, like the probes: the document describes routes and shapes, never data or keys. The
page is a few lines of our own script that fetches ``/openapi.json`` and lists every operation with its
access, parameters, body and answers; no CDN, no bundle.
"""

from __future__ import annotations

import asyncio
import functools
from importlib import metadata

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from balancer.http.openai_answers import dumps
from balancer.http.openapi import openapi_document
from balancer.http.route_table import Handlers


def _version() -> str:
    try:
        return metadata.version("llmlb")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmlb HTTP API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
details{border:1px solid #ccc;border-radius:6px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer}code,pre{font:13px ui-monospace,monospace}
pre{background:#f6f6f6;padding:.5rem;overflow:auto}
.m{display:inline-block;width:4.5rem;font-weight:bold}.GET{color:#06c}.POST{color:#080}.DELETE{color:#c00}
.lock{color:#888;font-size:12px}
</style></head><body>
<h1 id="title">llmlb HTTP API</h1>
<p>The machine-readable document: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="ops">Loading…</div>
<h2>Schemas</h2><div id="schemas"></div>
<script>
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  Object.assign(e, attrs || {});
  for (const k of kids) e.append(k);
  return e;
};
const pre = (value) => el("pre", {}, JSON.stringify(value, null, 2));
const link = (schema) => {
  const name = schema && schema.$ref ? schema.$ref.split("/").pop() : null;
  return name ? el("a", {href: "#schema-" + name}, name) : el("code", {}, JSON.stringify(schema));
};
fetch("/openapi.json").then((r) => r.json()).then((doc) => {
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  const ops = document.getElementById("ops");
  ops.textContent = "";
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const m = method.toUpperCase();
      const box = el("details", {},
        el("summary", {}, el("span", {className: "m " + m}, m), el("code", {}, path), " — " + op.summary,
           op.security.length ? el("span", {className: "lock"}, " (API key)") : ""));
      box.append(el("p", {}, op.description || ""));
      for (const p of op.parameters || []) {
        const where = p.in === "query" ? "Query parameter " : "Path parameter ";
        box.append(el("p", {}, where, el("code", {}, p.name)));
      }
      if (op.requestBody) {
        for (const [type, media] of Object.entries(op.requestBody.content)) {
          box.append(el("p", {}, "Body (" + type + "): ", link(media.schema)));
          if (media.example) box.append(el("p", {}, "Example:"), pre(media.example));
        }
      }
      const list = el("ul");
      for (const [status, answer] of Object.entries(op.responses)) {
        const item = el("li", {}, el("b", {}, status), " " + answer.description + " ");
        for (const [type, media] of Object.entries(answer.content || {})) {
          item.append(el("code", {}, type), " ", link(media.schema), " ");
        }
        list.append(item);
      }
      box.append(list);
      ops.append(box);
    }
  }
  const schemas = document.getElementById("schemas");
  for (const [name, schema] of Object.entries(doc.components.schemas)) {
    schemas.append(el("details", {id: "schema-" + name}, el("summary", {}, name), pre(schema)));
  }
  const target = location.hash && document.querySelector(location.hash);
  if (target) target.open = true;
  addEventListener("hashchange", () => {
    const t = document.querySelector(location.hash);
    if (t) t.open = true;
  });
}).catch((err) => { document.getElementById("ops").textContent = "Could not load /openapi.json: " + err; });
</script></body></html>
"""


@functools.cache
def document() -> bytes:
    """The document as served: built once per process, as the routes do not change while serving."""
    return dumps(openapi_document(_version()))


def docs_routes() -> Handlers:
    """``GET /openapi.json`` and ``GET /docs``, open to anyone."""
    building = asyncio.Lock()

    async def openapi_json(request: Request) -> Response:
        # Generating it takes FastAPI a second or more: not at start, where most processes never need
        # it, and off the event loop; callers that come meanwhile wait for the one build.
        async with building:
            built = await asyncio.to_thread(document)
        return Response(built, media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(PAGE)

    return {"openapi_json": openapi_json, "docs": docs}

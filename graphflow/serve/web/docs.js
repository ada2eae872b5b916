// The API reference: the service's /openapi.json drawn as HTML, one block per path and method, without any file
// from another host (the dashboard's rule). Text from the schema goes in through textContent only.
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function table(head, rows) {
  const t = el("table");
  const tr = el("tr");
  head.forEach((h) => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach((row) => {
    const r = el("tr");
    row.forEach((cell) => r.appendChild(el("td", cell)));
    t.appendChild(r);
  });
  return t;
}

function resolved(schema, spec) {  // a "#/components/schemas/X" reference to the schema it names
  const ref = schema && schema.$ref;
  if (!ref || !ref.startsWith("#/")) return schema;
  return ref.slice(2).split("/").reduce((at, key) => (at ? at[key] : undefined), spec) || schema;
}

function operation(path, verb, op, shared, spec) {
  const box = el("section", undefined, "op");
  box.dataset.path = path;
  box.dataset.method = verb;
  const h = el("h3");
  h.appendChild(el("span", verb, "verb"));
  h.appendChild(document.createTextNode(" " + path));
  box.appendChild(h);
  if (op.summary) box.appendChild(el("p", op.summary));
  if (op.description) box.appendChild(el("p", op.description, "muted"));
  const params = [...(shared || []), ...(op.parameters || [])];
  if (params.length) {
    box.appendChild(table(["parameter", "in", "type", "required"], params.map((p) => [
      p.name, p.in, (p.schema && p.schema.type) || "", p.required ? "yes" : ""])));
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) {
    Object.entries(body).forEach(([type, media]) => {
      box.appendChild(el("p", "request body: " + type));
      if (media.schema) box.appendChild(el("pre", JSON.stringify(resolved(media.schema, spec), null, 2)));
    });
  }
  const responses = Object.entries(op.responses || {});
  if (responses.length) {
    box.appendChild(table(["status", "response"], responses.map(([code, r]) => [code, r.description || ""])));
  }
  return box;
}

async function main() {
  const root = document.getElementById("api");
  let spec;
  try {
    const answer = await fetch("/openapi.json");
    spec = await answer.json();
  } catch (err) {
    document.getElementById("loading").textContent = "cannot read /openapi.json: " + err;
    return;
  }
  root.textContent = "";
  const info = spec.info || {};
  document.getElementById("title").textContent = (info.title || "API") + (info.version ? " " + info.version : "");
  if (info.description) root.appendChild(el("p", info.description));
  const verbs = ["get", "post", "put", "delete", "patch"];
  Object.keys(spec.paths || {}).sort().forEach((path) => {
    const item = spec.paths[path];
    verbs.filter((v) => item[v]).forEach((v) => root.appendChild(operation(path, v, item[v], item.parameters, spec)));
  });
}

main();

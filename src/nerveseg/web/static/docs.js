// Renders /openapi.json as a readable list of endpoints (no Swagger UI: it needs a CDN).
const root = document.getElementById("docs");
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
};

function schemaText(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    const s = spec.components.schemas[name];
    const props = s && s.properties ? Object.entries(s.properties).map(([k, v]) => `  ${k}: ${v.type || (v.anyOf ? v.anyOf.map((a) => a.type || a.$ref?.split("/").pop()).join(" | ") : v.$ref?.split("/").pop() || "object")}${v.description ? "  // " + v.description : ""}`) : [];
    return `${name} {\n${props.join("\n")}\n}`;
  }
  if (schema.type === "array") return `array of ${schemaText(schema.items, spec)}`;
  return schema.type || JSON.stringify(schema);
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  root.append(el("h2", { textContent: `${spec.info.title} ${spec.info.version}` }), el("p", { textContent: spec.info.description }));
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const params = (op.parameters || []).map((p) => el("tr", {},
        el("td", { textContent: p.name }), el("td", { textContent: p.in }),
        el("td", { textContent: p.schema ? (p.schema.type || (p.schema.anyOf || []).map((a) => a.type).join(" | ") || (p.schema.enum || []).join(" | ")) : "" }),
        el("td", { textContent: (p.required ? "required. " : "") + (p.description || "") + (p.schema && p.schema.default !== undefined ? ` (default ${JSON.stringify(p.schema.default)})` : "") })));
      const body = op.requestBody ? Object.entries(op.requestBody.content).map(([type, c]) =>
        el("p", {}, el("strong", { textContent: "Body " }), `${type}: ${op.requestBody.description || ""}`, el("pre", { textContent: schemaText(c.schema, spec) }))) : [];
      const responses = Object.entries(op.responses || {}).map(([code, r]) => {
        const content = r.content ? Object.entries(r.content)[0] : null;
        return el("tr", {}, el("td", { textContent: code }), el("td", { textContent: r.description || "" }),
          el("td", {}, content ? el("pre", { textContent: `${content[0]}\n${schemaText(content[1].schema, spec)}` }) : ""));
      });
      root.append(el("details", { className: "endpoint" },
        el("summary", {}, el("span", { className: `method ${method}`, textContent: method.toUpperCase() }),
          el("span", { className: "path", textContent: path }), el("span", { className: "muted", textContent: op.summary || "" })),
        el("div", { className: "body" },
          op.description ? el("p", { textContent: op.description }) : null,
          params.length ? el("table", {}, el("thead", {}, el("tr", {}, ...["parameter", "in", "type", ""].map((t) => el("th", { textContent: t })))), el("tbody", {}, ...params)) : null,
          ...body,
          el("table", {}, el("thead", {}, el("tr", {}, ...["status", "", "content"].map((t) => el("th", { textContent: t })))), el("tbody", {}, ...responses)))));
    }
  }
}
main().catch((e) => root.append(el("p", { textContent: "cannot load /openapi.json: " + e.message })));

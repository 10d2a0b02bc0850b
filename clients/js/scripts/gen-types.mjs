#!/usr/bin/env node
// Writes src/protocol.d.ts from ../../protocol/schema.json.
//
//   node scripts/gen-types.mjs           rewrite src/protocol.d.ts
//   node scripts/gen-types.mjs --check   exit 1 when src/protocol.d.ts is stale
//
// A small JSON Schema -> TypeScript converter covering what the protocol schema
// uses: objects (properties, required, additionalProperties), enums and const
// tags, arrays, anyOf/oneOf (with or without a discriminator), $ref, null,
// numbers, integers, strings and booleans. Anything else fails loudly.

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const SCHEMA = resolve(root, "../../protocol/schema.json");
const OUT = resolve(root, "src/protocol.d.ts");

// Definitions named like JavaScript globals also get a `<Name>Message` alias.
const SHADOWS = new Set(["Error", "Map", "Object", "String", "Number", "Boolean", "Array"]);

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

/** @param {string} ref */
function refName(ref) {
  const m = /^#\/\$defs\/([A-Za-z_$][A-Za-z0-9_$]*)$/.exec(ref);
  if (!m) throw new Error(`unsupported $ref ${JSON.stringify(ref)}`);
  return m[1];
}

/** @param {unknown} value */
function literal(value) {
  if (value === null || ["string", "number", "boolean"].includes(typeof value)) {
    return JSON.stringify(value);
  }
  throw new Error(`unsupported enum/const value ${JSON.stringify(value)}`);
}

/** @param {string} t */
function paren(t) {
  return /[|&]/.test(t) ? `(${t})` : t;
}

/** Constraints worth telling a reader, as short notes. */
function constraints(schema) {
  const notes = [];
  const s = schema.anyOf ? schema.anyOf.find((x) => x.type !== "null") ?? schema : schema;
  if (!s || typeof s !== "object") return notes;
  if (s.type === "integer") notes.push("integer");
  const min = s.minimum ?? s.exclusiveMinimum;
  const max = s.maximum ?? s.exclusiveMaximum;
  if (min !== undefined || max !== undefined) {
    const lo = min === undefined ? "" : `${min} ${s.exclusiveMinimum !== undefined ? "<" : "≤"} `;
    const hi = max === undefined ? "" : ` ${s.exclusiveMaximum !== undefined ? "<" : "≤"} ${max}`;
    notes.push(`${lo}value${hi}`);
  }
  if (s.minLength !== undefined || s.maxLength !== undefined) {
    notes.push(`length ${s.minLength ?? 0}..${s.maxLength ?? "∞"}`);
  }
  if (s.minItems !== undefined || s.maxItems !== undefined) {
    notes.push(`items ${s.minItems ?? 0}..${s.maxItems ?? "∞"}`);
  }
  if (s.pattern !== undefined) notes.push(`pattern \`${s.pattern}\``);
  if (s.items && typeof s.items === "object") {
    const inner = constraints(s.items).filter((n) => n !== "integer");
    if (inner.length) notes.push(`each: ${inner.join(", ")}`);
  }
  return notes;
}

/**
 * The TypeScript type of a schema.
 * @param {any} schema
 * @param {string} indent
 * @returns {string}
 */
function typeOf(schema, indent) {
  if (schema === true || (typeof schema === "object" && Object.keys(schema).length === 0)) {
    return "unknown";
  }
  if (typeof schema !== "object" || schema === null) {
    throw new Error(`unsupported schema ${JSON.stringify(schema)}`);
  }
  if (schema.nullable === true) {
    const { nullable: _, ...rest } = schema;
    const inner = typeOf(rest, indent);
    return inner.split(" | ").includes("null") ? inner : `${inner} | null`;
  }
  if (schema.$ref) return refName(schema.$ref);
  if ("const" in schema) return literal(schema.const);
  if (schema.enum) return schema.enum.map(literal).join(" | ");
  const union = schema.anyOf ?? schema.oneOf;
  if (union) {
    const parts = union.map((s) => typeOf(s, indent));
    return [...new Set(parts)].join(" | ");
  }
  const type = schema.type;
  if (Array.isArray(type)) {
    return type.map((t) => typeOf({ ...schema, type: t }, indent)).join(" | ");
  }
  switch (type) {
    case "null":
      return "null";
    case "string":
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "array": {
      if (schema.items === undefined) return "unknown[]";
      return `${paren(typeOf(schema.items, indent))}[]`;
    }
    case "object":
    case undefined:
      if (type === undefined && !schema.properties) {
        throw new Error(`unsupported schema without type: ${JSON.stringify(schema)}`);
      }
      return objectBody(schema, indent);
    default:
      throw new Error(`unsupported type ${JSON.stringify(type)}`);
  }
}

/** @param {string} text @param {string} indent */
function docComment(text, indent) {
  const lines = text
    .split("\n")
    .map((l) => l.trim())
    .map((l) => l.replace(/``/g, "`").replace(/\*\//g, "*\\/"));
  while (lines.length && lines[lines.length - 1] === "") lines.pop();
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => (l ? `${indent} * ${l}` : `${indent} *`)).join("\n")}\n${indent} */\n`;
}

/**
 * @param {any} schema an object schema
 * @param {string} indent
 */
function objectBody(schema, indent) {
  const props = schema.properties ?? {};
  const required = schema.required ?? [];
  for (const r of required) {
    if (!(r in props)) throw new Error(`required property ${r} has no schema`);
  }
  const names = [...required, ...Object.keys(props).filter((n) => !required.includes(n))];
  const inner = `${indent}  `;
  let out = "{\n";
  for (const name of names) {
    const prop = props[name];
    const notes = [];
    if (prop.description) notes.push(prop.description);
    const c = constraints(prop);
    if (c.length) notes.push(c.join("; "));
    if ("default" in prop) notes.push(`@default ${JSON.stringify(prop.default)}`);
    if (notes.length) out += docComment(notes.join("\n"), inner);
    const key = IDENT.test(name) ? name : JSON.stringify(name);
    const opt = required.includes(name) ? "" : "?";
    out += `${inner}${key}${opt}: ${typeOf(prop, inner)};\n`;
  }
  const extra = schema.additionalProperties;
  if (extra && extra !== false && typeof extra === "object") {
    out += `${inner}[key: string]: ${typeOf(extra, inner)} | undefined;\n`;
  }
  return `${out}${indent}}`;
}

/** @param {any} schema */
export function render(schema) {
  const defs = schema.$defs ?? {};
  let out =
    "// Generated by scripts/gen-types.mjs from protocol/schema.json; do not edit.\n" +
    "// Regenerate with `npm run gen-types`; `npm run check-types` fails when stale.\n";
  if (schema.title) out += `//\n// ${schema.title}\n`;
  if (schema.description) out += `// ${schema.description}\n`;
  for (const [name, def] of Object.entries(defs)) {
    if (!IDENT.test(name)) throw new Error(`definition name ${name} is not an identifier`);
    out += "\n";
    const notes = [];
    if (def.description) notes.push(def.description);
    if (notes.length) out += docComment(notes.join("\n"), "");
    const union = def.anyOf ?? def.oneOf;
    const isObject = !union && (def.type === "object" || (def.type === undefined && def.properties));
    if (isObject) {
      out += `export interface ${name} ${objectBody(def, "")}\n`;
    } else if (union) {
      const members = union.map((s) => typeOf(s, "  "));
      out += `export type ${name} =\n${members.map((m) => `  | ${m}`).join("\n")};\n`;
      const disc = def.discriminator;
      if (disc?.mapping) {
        const tags = Object.keys(disc.mapping);
        out += `\n/** The \`${disc.propertyName}\` values of ${name}. */\n`;
        out += `export type ${name}Type = ${tags.map(literal).join(" | ")};\n`;
        out += `\n/** ${name} by its \`${disc.propertyName}\`. */\n`;
        out += `export interface ${name}Map {\n`;
        for (const [tag, ref] of Object.entries(disc.mapping)) {
          out += `  ${IDENT.test(tag) ? tag : JSON.stringify(tag)}: ${refName(ref)};\n`;
        }
        out += "}\n";
      }
    } else {
      out += `export type ${name} = ${typeOf(def, "")};\n`;
    }
    if (SHADOWS.has(name)) {
      out += `\n/** \`${name}\` under a name that does not shadow the global \`${name}\`. */\n`;
      out += `export type ${name}Message = ${name};\n`;
    }
  }
  return out;
}

function main(argv) {
  const check = argv.includes("--check");
  const schema = JSON.parse(readFileSync(SCHEMA, "utf8"));
  const text = render(schema);
  const rel = relative(process.cwd(), OUT) || OUT;
  if (check) {
    let current = null;
    try {
      current = readFileSync(OUT, "utf8");
    } catch {
      // missing: stale
    }
    if (current !== text) {
      console.error(`${rel} is stale: it does not match protocol/schema.json; run npm run gen-types`);
      return 1;
    }
    console.log(`${rel} is up to date`);
    return 0;
  }
  writeFileSync(OUT, text);
  console.log(`wrote ${rel}`);
  return 0;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = main(process.argv.slice(2));
}

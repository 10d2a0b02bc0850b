// Builds the chat page's third-party code into ../static/vendor/, which is
// committed: the server serves the page as static files, with no build step at
// run time and nothing fetched from elsewhere.
//
//   npm ci && npm run build    rewrite ../static/vendor/ from entry.js and the
//                              versions pinned in package-lock.json
//   npm run check              build into a temporary folder and fail unless
//                              every file there equals the committed one, byte
//                              for byte (the build is deterministic)
//
// What it writes:
//   markdown.js    entry.js and its libraries, one minified ES module
//   highlight.css  highlight.js's GitHub themes: light, and dark where the page
//                  is dark (data-theme="dark" on <html>, or the system's dark
//                  mode while the page follows it: no data-theme="light")
//   LICENSES.txt   the licences of everything bundled (their own copyright
//                  comments also stay in markdown.js and highlight.css)
//
// Why these libraries:
//   * marked (MIT): a small, fast, maintained CommonMark + GitHub-flavoured
//     markdown parser whose renderer is easy to override per element (code
//     blocks, raw HTML, images). It does not sanitise, so:
//   * DOMPurify (Apache-2.0 or MPL-2.0): the maintained reference HTML
//     sanitiser, run in the browser on every rendered answer (no scripts, no
//     event handlers, no javascript: URLs), behind the page's own escaping of
//     raw HTML in the markdown (render.js).
//   * highlight.js core (BSD-3-Clause) with only the languages entry.js
//     registers: no dependencies, and a theme is plain CSS classes.
//   markdown-it escapes raw HTML by default, but with its dependencies
//   (entities, linkify-it, mdurl, punycode) it is about twice marked's size,
//   and its output would still be sanitised: marked + DOMPurify is smaller for
//   the same guarantees.
//   esbuild (MIT) bundles and minifies; its output depends only on its inputs
//   and its pinned version.
import { build } from "esbuild";
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const committed = join(here, "..", "static", "vendor");
const check = process.argv.includes("--check");
const out = check ? mkdtempSync(join(tmpdir(), "ferrous-vendor-")) : committed;

// Browsers the page supports; esbuild lowers newer syntax (e.g. CSS nesting) for them.
const target = ["chrome105", "edge105", "firefox110", "safari16"];
const pkg = (name) => JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8"));
const bundled = ["marked", "dompurify", "highlight.js"];
const licence = (name) => pkg(name).license.replace(/^\((.*)\)$/, "$1"); // "(A OR B)": A OR B

async function buildScript() {
  // marked's and highlight.js's copyright headers are not /*! comments, which
  // are the ones a minifier keeps: name every bundled package up front instead.
  const notice = bundled.map((name) => `${name} ${pkg(name).version} (${licence(name)})`).join(", ");
  await build({
    banner: { js: `/*! Bundled: ${notice}. Licences: LICENSES.txt, next to this file. */` },
    absWorkingDir: here,
    entryPoints: ["entry.js"],
    outfile: join(out, "markdown.js"),
    bundle: true,
    format: "esm",
    platform: "browser",
    target,
    minify: true,
    legalComments: "inline",
    logLevel: "warning",
  });
}

async function buildThemes() {
  // Only the colours: the page's own style.css lays code blocks out and gives
  // them a background that suits both light and dark.
  const theme = (name) => {
    let css = readFileSync(join(here, "node_modules", "highlight.js", "styles", `${name}.css`), "utf8");
    for (const [pattern, replacement] of [
      [/^pre code\.hljs\s*\{[^}]*\}\s*/m, ""],
      [/^code\.hljs\s*\{[^}]*\}\s*/m, ""],
      [/^(\.hljs\s*\{[^}]*?)\s*;?\s*background:[^;}]*/m, "$1"],
    ]) {
      if (!pattern.test(css)) throw new Error(`highlight.js's ${name}.css has changed: ${pattern} no longer matches`);
      css = css.replace(pattern, replacement);
    }
    return css;
  };
  const { version } = pkg("highlight.js");
  const css = [
    `/*! highlight.js ${version} themes "GitHub" (light) and "GitHub Dark" | BSD-3-Clause | see LICENSES.txt */`,
    theme("github"),
    `:root[data-theme="dark"] {\n${theme("github-dark")}\n}`,
    `@media (prefers-color-scheme: dark) {\n:root:not([data-theme="light"]) {\n${theme("github-dark")}\n}\n}`,
  ].join("\n");
  await build({
    absWorkingDir: here,
    stdin: { contents: css, loader: "css", sourcefile: "highlight.css" },
    outfile: join(out, "highlight.css"),
    target,
    minify: true,
    legalComments: "inline",
    logLevel: "warning",
  });
}

function writeLicenses() {
  const parts = [
    "Third-party code bundled in markdown.js and highlight.css, with its licences.\n",
  ];
  for (const name of bundled) {
    const { version, homepage } = pkg(name);
    const dir = join(here, "node_modules", name);
    const files = readdirSync(dir).filter((f) => /^licen[cs]e/i.test(f)).sort();
    parts.push(`${"=".repeat(78)}\n${name} ${version} (${licence(name)})\n${homepage ?? ""}\n${"=".repeat(78)}\n`);
    for (const f of files) {
      if (files.length > 1) parts.push(`--- ${f} ---\n`);
      parts.push(readFileSync(join(dir, f), "utf8").replace(/\r\n/g, "\n").trimEnd() + "\n\n");
    }
  }
  writeFileSync(join(out, "LICENSES.txt"), parts.join("\n").trimEnd() + "\n");
}

if (!check) rmSync(out, { recursive: true, force: true }); // nothing stale is left behind
mkdirSync(out, { recursive: true });
await buildScript();
await buildThemes();
writeLicenses();

if (check) {
  const built = files(out);
  const have = files(committed);
  const problems = [];
  for (const f of new Set([...built, ...have])) {
    if (!have.includes(f)) problems.push(`missing from static/vendor: ${f}`);
    else if (!built.includes(f)) problems.push(`not produced by the build: static/vendor/${f}`);
    else if (!readFileSync(join(out, f)).equals(readFileSync(join(committed, f)))) {
      problems.push(`differs from a fresh build: static/vendor/${f}`);
    }
  }
  rmSync(out, { recursive: true, force: true });
  if (problems.length) {
    console.error(`${problems.join("\n")}\nRun \`npm ci && npm run build\` in gateway/static-src and commit the result.`);
    process.exit(1);
  }
  console.log(`static/vendor matches a fresh build (${built.join(", ")})`);
} else {
  console.log(`built ${files(out).join(", ")}`);
}

function files(dir) {
  try {
    return readdirSync(dir).sort();
  } catch {
    return [];
  }
}

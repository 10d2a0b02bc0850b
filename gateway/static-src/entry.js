// The chat page's third-party code, bundled into one ES module
// (../static/vendor/markdown.js, built by `npm run build`; see build.mjs).
//
//   Marked     markdown to HTML (CommonMark and GitHub's extensions: tables,
//              task lists, strikethrough, bare links)
//   DOMPurify  the HTML sanitiser every rendered answer goes through
//   hljs       highlight.js's core with the languages registered below; a code
//              block in any other language is shown without colours
export { Marked } from "marked";
export { default as DOMPurify } from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import go from "highlight.js/lib/languages/go";
import ini from "highlight.js/lib/languages/ini";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import markdown from "highlight.js/lib/languages/markdown";
import plaintext from "highlight.js/lib/languages/plaintext";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import shell from "highlight.js/lib/languages/shell";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

// Each brings its usual aliases too: py, sh, zsh, js, jsx, ts, tsx, h, cc, hpp,
// rs, golang, html, svg, yml, toml, md, patch, text, console, ...
const languages = {
  bash, c, cpp, css, diff, go, ini, javascript, json, markdown, plaintext, python,
  rust, shell, sql, typescript, xml, yaml,
};
for (const [name, language] of Object.entries(languages)) hljs.registerLanguage(name, language);

export { hljs };

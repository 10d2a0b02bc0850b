// Images on the chat page: an attached picture read by the chat model when it is a
// vision language model (sent with the next question over the WebSocket), otherwise
// classified by an image model; pictures drawn by an image generation model; all shown
// inline in the conversation. Besides the WebSocket they use the server's HTTP routes
// (/v1/models, /v1/classify, /v1/images/generations) with the page's own token; nothing
// is uploaded anywhere else.

/** @param {string | null} token */
function headers(token) {
  const h = { "Content-Type": "application/json" };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function post(path, body, token) {
  const r = await fetch(path, { method: "POST", headers: headers(token), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const error = data.error || {};
    throw new Error(error.message || `${path} answered ${r.status}`);
  }
  return data;
}

/** A file's bytes as base64 (no data: prefix). @param {Blob} file */
export async function base64Of(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/**
 * A picture for a vision chat model, small enough for one WebSocket frame: one whose
 * long side is over `maxSide` pixels, or whose file is over `maxBytes`, is scaled
 * down and re-encoded as JPEG (a model's encoder reads a few hundred pixels anyway).
 * @param {Blob} file @param {number} [maxSide] @param {number} [maxBytes]
 * @returns {Promise<Blob>}
 */
export async function forChat(file, maxSide = 1024, maxBytes = 512 * 1024) {
  const bitmap = await createImageBitmap(file);
  try {
    const scale = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
    if (scale === 1 && file.size <= maxBytes) return file;
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return await new Promise((resolve, reject) => canvas.toBlob(
      (blob) => (blob ? resolve(blob) : reject(new Error("the image could not be encoded"))),
      "image/jpeg", 0.9,
    ));
  } finally {
    bitmap.close();
  }
}

/** @type {Map<string, Promise<boolean>>} */
const reads = new Map();

/**
 * Whether chat model `model` reads images (a vision language model: "vision" among
 * its capabilities on /v1/models), asked once per model.
 * @param {string} model @param {string | null} token @returns {Promise<boolean>}
 */
export function readsImages(model, token) {
  let known = reads.get(model);
  if (!known) {
    known = fetch(`/v1/models/${encodeURIComponent(model)}`, { headers: headers(token) })
      .then((r) => (r.ok ? r.json() : {}))
      .then((data) => Boolean(data.details?.capabilities?.includes("vision")))
      .catch(() => false);
    reads.set(model, known);
  }
  return known;
}

/**
 * The labels an image classifier gives a picture, likeliest first.
 * @param {Blob} file @param {string} model @param {string | null} token
 * @returns {Promise<{label: string, score: number}[]>}
 */
export async function classify(file, model, token) {
  const data = await post("/v1/classify", { model, images: [await base64Of(file)], top_k: 3 }, token);
  return data.results[0].labels;
}

/**
 * Pictures of `prompt` from an image generation model, as data URLs, and their seed.
 * @param {string} prompt @param {string} model @param {string | null} token
 * @returns {Promise<{urls: string[], seed: number}>}
 */
export async function draw(prompt, model, token) {
  const data = await post("/v1/images/generations", { model, prompt, n: 1 }, token);
  return { urls: data.data.map((d) => `data:image/png;base64,${d.b64_json}`), seed: data.seed };
}

/** An <img> for a picture in the conversation. @param {string} src @param {string} alt */
export function picture(src, alt) {
  const img = document.createElement("img");
  img.className = "picture";
  img.src = src;
  img.alt = alt;
  return img;
}

// Conversations kept in this browser (IndexedDB), so a reload or a server
// restart loses nothing the user saw. A record:
//
//   { id, title, model, turns: [{ role: "user" | "assistant", text, stats? }], updated }
//
// The server keeps its own copy of a conversation only while it runs; the page
// replays a stored conversation's turns as messages when it continues one the
// server no longer has (see app.js), so the model always sees the whole of it.

const DB = "ferrous-chat";
const STORE = "conversations";

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function run(mode, action) {
  const db = await open();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = action(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req?.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

/** Every stored conversation, most recently updated first. */
export async function list() {
  const all = (await run("readonly", (s) => s.getAll())) ?? [];
  return all.sort((a, b) => b.updated - a.updated);
}

export function get(id) {
  return run("readonly", (s) => s.get(id));
}

export function save(record) {
  return run("readwrite", (s) => s.put({ ...record, updated: Date.now() }));
}

export function remove(id) {
  return run("readwrite", (s) => s.delete(id));
}

/** A title from the first question: its first line, at most 48 characters. */
export function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

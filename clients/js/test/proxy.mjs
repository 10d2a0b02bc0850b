// A TCP proxy between a client and the server that can cut connections the
// way a network does: both sockets destroyed at a chosen byte, no WebSocket
// close frame either way (the peers see code 1006).
//
//   const proxy = await startProxy(server.port);
//   proxy.url                          ws://127.0.0.1:<proxy port>/v1/ws
//   proxy.cut("down", 1234)            cut every open connection once 1234 more
//                                      bytes went server -> client ("up": client -> server)
//   proxy.mode = "refuse" | "hold" | "open"
//                                      new connections: closed at once / held
//                                      unanswered until open again / forwarded
//   await proxy.close()

import { connect, createServer } from "node:net";

/**
 * @param {number} targetPort
 * @param {string} [path] the WebSocket path for `url`
 */
export async function startProxy(targetPort, path = "/v1/ws") {
  /** @typedef {{ client: import("node:net").Socket, upstream: import("node:net").Socket | null, cut: { dir: "up" | "down", left: number } | null, dead: boolean }} Conn */
  /** @type {Set<Conn>} */
  const conns = new Set();
  /** @type {Conn[]} */
  const held = [];
  let mode = "open";
  let connections = 0;

  /** @param {Conn} conn */
  function kill(conn) {
    if (conn.dead) return;
    conn.dead = true;
    conns.delete(conn);
    conn.client.destroy();
    conn.upstream?.destroy();
  }

  /**
   * Forward a chunk, or its part before an armed cut (which then kills both ends).
   * @param {Conn} conn @param {"up" | "down"} dir @param {Buffer} chunk @param {import("node:net").Socket} to
   */
  function forward(conn, dir, chunk, to) {
    if (conn.dead) return;
    const cut = conn.cut;
    if (cut && cut.dir === dir) {
      if (chunk.length >= cut.left) {
        const part = chunk.subarray(0, cut.left);
        conn.dead = true;
        conns.delete(conn);
        const other = to === conn.client ? conn.upstream : conn.client;
        other?.destroy();
        // The bytes before the cut still go out, then the socket closes (no close frame).
        if (part.length > 0) to.end(part, () => to.destroy());
        else to.destroy();
        return;
      }
      cut.left -= chunk.length;
    }
    to.write(chunk);
  }

  /** @param {Conn} conn */
  function link(conn) {
    const upstream = connect(targetPort, "127.0.0.1");
    conn.upstream = upstream;
    upstream.on("data", (chunk) => forward(conn, "down", chunk, conn.client));
    conn.client.on("data", (chunk) => forward(conn, "up", chunk, upstream));
    upstream.on("error", () => kill(conn));
    upstream.on("close", () => kill(conn));
    conn.client.resume();
  }

  const server = createServer((client) => {
    connections += 1;
    /** @type {Conn} */
    const conn = { client, upstream: null, cut: null, dead: false };
    client.on("error", () => kill(conn));
    client.on("close", () => kill(conn));
    if (mode === "refuse") {
      client.destroy();
      return;
    }
    conns.add(conn);
    client.pause(); // what it sends waits in its socket until the conn is linked
    if (mode === "hold") held.push(conn);
    else link(conn);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(undefined)));
  const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());

  return {
    port,
    url: `ws://127.0.0.1:${port}${path}`,
    /** Connections accepted so far. */
    get connections() {
      return connections;
    },
    /** Connections open now. */
    get open() {
      return conns.size;
    },
    get mode() {
      return mode;
    },
    set mode(value) {
      mode = value;
      if (mode !== "hold") {
        for (const conn of held.splice(0)) {
          if (conn.dead) continue;
          if (mode === "open") link(conn);
          else kill(conn);
        }
      }
    },
    /**
     * Cut every connection open now once `bytes` more bytes went in direction `dir`.
     * @param {"up" | "down"} dir @param {number} bytes
     */
    cut(dir, bytes) {
      for (const conn of conns) conn.cut = { dir, left: Math.max(0, bytes) };
    },
    /** Cut every connection open now, at once. */
    drop() {
      for (const conn of [...conns]) kill(conn);
    },
    /** Forget armed cuts that did not happen. */
    disarm() {
      for (const conn of conns) conn.cut = null;
    },
    async close() {
      for (const conn of [...conns]) kill(conn);
      for (const conn of held.splice(0)) kill(conn);
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}

// The Socket.IO peer of `make bench`: the same room chat as the Channels one, the way a Socket.IO team
// would scale it. WORKERS Node processes share one listening socket (the kernel spreads connections, as
// with gunicorn's workers), each joins a socket to the room named in its handshake's query, and a
// "message" event is emitted to the whole room, sender included, through the sharded Redis adapter: one
// SPUBLISH per room message to the room's own channel, which every process holding a member of the room
// has subscribed to (subscriptionMode "dynamic", the default).
//
// PORT, WORKERS and REDIS_CLUSTER_NODES (host:port,...) configure it; the primary prints "ready" once
// every worker listens, and every handshake answers with X-Served-By: the pid of the worker that took it.
const cluster = require("node:cluster");
const http = require("node:http");

const port = Number(process.env.PORT);
const workers = Number(process.env.WORKERS || 3);

if (cluster.isPrimary) {
  // The kernel hands each connection to a worker, so the primary is idle once they listen.
  cluster.schedulingPolicy = cluster.SCHED_NONE;
  let listening = 0;
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on("listening", () => {
    if (++listening === workers) console.log("ready");
  });
  cluster.on("exit", (worker, code) => {
    console.error(`worker ${worker.process.pid} exited (${code})`);
    process.exit(1);
  });
  process.on("SIGTERM", () => {
    for (const worker of Object.values(cluster.workers)) worker.kill();
    process.exit(0);
  });
} else {
  const { createCluster } = require("redis");
  const { Server } = require("socket.io");
  const { createShardedAdapter } = require("@socket.io/redis-adapter");

  const rootNodes = process.env.REDIS_CLUSTER_NODES.split(",").map((node) => ({ url: `redis://${node}` }));
  const pubClient = createCluster({ rootNodes });
  const subClient = pubClient.duplicate();

  (async () => {
    await Promise.all([pubClient.connect(), subClient.connect()]);
    const server = http.createServer((request, response) => {
      response.writeHead(request.url === "/readyz" ? 200 : 404).end();
    });
    const io = new Server(server, {
      transports: ["websocket"],
      serveClient: false,
      perMessageDeflate: false,
      adapter: createShardedAdapter(pubClient, subClient),
    });
    io.engine.on("initial_headers", (headers) => {
      headers["X-Served-By"] = `socketio:${process.pid}`;
    });
    io.on("connection", async (socket) => {
      const room = String(socket.handshake.query.room);
      // The join resolves once this process has subscribed to the room's channel; "joined" tells the
      // client it will hear the room from now on, as the chat's accepted handshake does.
      await socket.join(room);
      socket.emit("joined", room);
      socket.on("message", (text) => io.to(room).emit("message", text));
    });
    server.listen({ port, host: "127.0.0.1", backlog: 4096 });
  })().catch((error) => {
    console.error(error);
    process.exit(1);
  });
}

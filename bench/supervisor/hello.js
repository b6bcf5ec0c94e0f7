// Node HTTP hello for PM2 (cluster mode): `GET /` answers the worker's pid.
const http = require("http");
const port = parseInt(process.env.PORT, 10);
http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain", Connection: "close" });
  res.end(`${process.pid}\n`);
}).listen(port, "127.0.0.1");

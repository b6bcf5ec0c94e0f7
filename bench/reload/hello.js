// Node HTTP hello for PM2 cluster mode (bench/reload): `GET /` answers the worker's pid.
// Keep-alive as Node does by default, like every other server in the comparison.
const http = require("http");
const port = parseInt(process.env.PORT, 10);
const body = `${process.pid}\n`;
http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": body.length });
  res.end(body);
}).listen(port, "127.0.0.1");

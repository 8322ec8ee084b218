"""nginx inside a test namespace, with the endpoints the demo, tests and bench use.

/ok answers 200 and /error 500 with bodies chosen so both responses have the same
length on the wire (the thesis's method: 'OK' is 18 bytes shorter than 'Internal Server
Error'); /missing answers 404; /big answers 200 with 256 KiB, for multi-segment flows.
The same endpoints answer HTTP/2 cleartext (prior knowledge, no upgrade: how 5G service
interfaces and gRPC speak it) on `h2_port` (default 8080) when one is given."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .netns import Host, stop_process

BODY_500 = "error"
BODY_200 = BODY_500 + "x" * 18

CONFIG = """\
daemon off;
user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    default_type text/plain;
    server {{
        listen {port} reuseport;
        listen [::]:{port} reuseport;
{h2_listen}        location = /ok      {{ return 200 '{body200}'; }}
        location = /error   {{ return 500 '{body500}'; }}
        location = /missing {{ return 404 'missing'; }}
        location = /big     {{ alias {dir}/big.bin; }}
        location / {{ return 200 'ok'; }}
    }}
}}
"""
# nginx 1.22 (Debian bookworm): a port with `http2` speaks only h2c with prior knowledge.
H2_LISTEN = """\
        listen {port} http2 reuseport;
        listen [::]:{port} http2 reuseport;
"""


class Nginx:
    def __init__(self, host: Host, port: int = 80, workers: int = 1, h2_port: int | None = None):
        self.host, self.port, self.workers, self.h2_port = host, port, workers, h2_port
        self.dir = Path(tempfile.mkdtemp(prefix="mirror-nginx-"))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Nginx":
        (self.dir / "big.bin").write_bytes(os.urandom(256 * 1024))
        conf = self.dir / "nginx.conf"
        h2_listen = H2_LISTEN.format(port=self.h2_port) if self.h2_port else ""
        conf.write_text(CONFIG.format(dir=self.dir, port=self.port, workers=self.workers,
                                      body200=BODY_200, body500=BODY_500, h2_listen=h2_listen))
        self.proc = self.host.popen("nginx", "-c", str(conf), "-e", str(self.dir / "error.log"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection((self.host.ns_v4, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        stop_process(self.proc)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

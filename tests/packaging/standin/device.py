"""A tiny HTTP device for the `http` driver: GET/PUT /state/<service> as {"value": true|false}.

It wants `Authorization: Bearer <token>` where the token is in /run/device-token (the agent has it as
a compose secret named by the device's credential). State is kept in /tmp/device-state.json.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATE = Path("/tmp/device-state.json")
TOKEN = Path("/run/device-token").read_text().strip()


class Device(BaseHTTPRequestHandler):
    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, {"error": "unauthorised"})
        return False

    def _reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _service(self) -> str | None:
        parts = self.path.split("/")
        return parts[2] if len(parts) == 3 and parts[1] == "state" else None

    def do_GET(self) -> None:
        service = self._service()
        if not self._authorised():
            return
        if service is None:
            self._reply(200, {"ok": True})
            return
        states = json.loads(STATE.read_text()) if STATE.exists() else {}
        self._reply(200, {"value": states.get(service, False)})

    def do_PUT(self) -> None:
        service = self._service()
        if not self._authorised() or service is None:
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        states = json.loads(STATE.read_text()) if STATE.exists() else {}
        states[service] = bool(body["value"])
        STATE.write_text(json.dumps(states))
        self._reply(200, {"value": states[service]})

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Device).serve_forever()

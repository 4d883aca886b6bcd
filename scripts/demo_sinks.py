"""Local stand-ins for the providers of the journey demo (scripts/demo_story.sh).

One process, standard library only, listening on 127.0.0.1:

- an HTTP server answering like Telegram's Bot API (``POST /bot<token>/sendMessage``, the push
  step of the demo) and Twilio's Messages API (``POST /2010-04-01/Accounts/<sid>/Messages.json``);
  ``GET /received`` returns what arrived so far as JSON (``{"telegram": [...], "sms": [...],
  "email": [...]}``, one recipient per message);
- an SMTP server (no TLS, no auth) that accepts every message.

It prints one JSON line with its ports (``{"http": 41234, "smtp": 41235}``) once both listen,
then serves until killed.
"""

from __future__ import annotations

import json
import re
import socketserver
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_LOCK = threading.Lock()
_RECEIVED: dict[str, list[str]] = {"telegram": [], "sms": [], "email": []}
_TWILIO = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages\.json$")


def _record(kind: str, recipient: str) -> int:
    with _LOCK:
        _RECEIVED[kind].append(recipient)
        return len(_RECEIVED[kind])


class _Http(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the demo prints what matters

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/received":
            with _LOCK:
                self._answer(200, _RECEIVED)
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/bot") and self.path.endswith("/sendMessage"):
            chat = str(json.loads(body or b"{}").get("chat_id", ""))
            number = _record("telegram", chat)
            self._answer(200, {"ok": True, "result": {"message_id": number, "chat": {"id": chat}}})
        elif match := _TWILIO.match(self.path):
            form = urllib.parse.parse_qs(body.decode())
            to = form.get("To", [""])[0]
            number = _record("sms", to)
            self._answer(
                201,
                {"sid": f"SM{number:032x}", "status": "queued", "to": to, "account_sid": match[1]},
            )
        else:
            self._answer(404, {"error": "not found"})


class _Smtp(socketserver.StreamRequestHandler):
    """Just enough SMTP for one client: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self._reply("220 demo-sink ESMTP")
        recipients: list[str] = []
        while line := self.rfile.readline():
            command = line.decode(errors="replace").strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                self._reply("250-demo-sink\r\n250 8BITMIME" if verb == "EHLO" else "250 demo-sink")
            elif verb == "RCPT":
                recipients.append(command.partition(":")[2].strip().strip("<>"))
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                while (data := self.rfile.readline()) and data.rstrip(b"\r\n") != b".":
                    pass
                for recipient in recipients:
                    _record("email", recipient)
                recipients = []
                self._reply("250 OK queued")
            elif verb == "QUIT":
                self._reply("221 Bye")
                return
            elif verb == "RSET":
                recipients = []
                self._reply("250 OK")
            else:  # MAIL, NOOP and anything else
                self._reply("250 OK")


class _SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    http.daemon_threads = True
    smtp = _SmtpServer(("127.0.0.1", 0), _Smtp)
    threading.Thread(target=smtp.serve_forever, daemon=True).start()
    print(json.dumps({"http": http.server_address[1], "smtp": smtp.server_address[1]}), flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

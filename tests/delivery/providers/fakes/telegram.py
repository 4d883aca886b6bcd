"""A Telegram Bot API server: ``sendMessage`` with the Bot API's answers and error shapes."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from tests.delivery.providers.fakes.server import FakeHttpServer, Reply, Request

_PATH = re.compile(r"/bot(?P<token>[^/]+)/(?P<method>\w+)")


@dataclass
class Sent:
    """A message the fake accepted."""

    chat_id: str
    text: str
    parse_mode: str | None
    message_id: int


class FakeTelegram(FakeHttpServer):
    """Accepts the bot whose token is ``bot_token``; chats can be set to misbehave.

    Attributes:
        blocked: Chat ids whose user blocked the bot (403).
        flooded: Chat id → seconds the bot must wait (429 with ``retry_after``).
        migrated: Chat id → the supergroup id it became (400 with ``migrate_to_chat_id``).
        failing: Answer 502 to everything (Bot API behind a failing proxy).
    """

    def __init__(self, bot_token: str) -> None:
        super().__init__()
        self.bot_token = bot_token
        self.blocked: set[str] = set()
        self.flooded: dict[str, int] = {}
        self.migrated: dict[str, int] = {}
        self.failing = False
        self.sent: list[Sent] = []
        self._ids = itertools.count(100)

    async def answer(self, request: Request) -> Reply:
        if self.failing:
            return Reply(502, b"<html>Bad Gateway</html>", {"content-type": "text/html"})
        match = _PATH.fullmatch(request.path)
        if match is None or request.method != "POST":
            return _error(404, "Not Found")
        if match["token"] != self.bot_token:
            return _error(401, "Unauthorized")
        if match["method"] != "sendMessage":
            return _error(404, "Not Found: method not found")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(400, "Bad Request: expected a JSON body")
        body = request.json()
        chat_id = str(body.get("chat_id", ""))
        text = body.get("text", "")
        parse_mode = body.get("parse_mode")
        if not chat_id:
            return _error(400, "Bad Request: chat_id is empty")
        if not text:
            return _error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        if parse_mode is not None and parse_mode not in ("HTML", "MarkdownV2", "Markdown"):
            return _error(400, f"Bad Request: unsupported parse_mode {parse_mode}")
        if chat_id in self.blocked:
            return _error(403, "Forbidden: bot was blocked by the user")
        if chat_id in self.flooded:
            wait = self.flooded[chat_id]
            return _error(
                429, f"Too Many Requests: retry after {wait}", parameters={"retry_after": wait}
            )
        if chat_id in self.migrated:
            return _error(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                parameters={"migrate_to_chat_id": self.migrated[chat_id]},
            )
        message_id = next(self._ids)
        self.sent.append(Sent(chat_id, text, parse_mode, message_id))
        return Reply.json(
            200,
            {
                "ok": True,
                "result": {
                    "message_id": message_id,
                    "from": {"id": int(self.bot_token.split(":")[0]), "is_bot": True},
                    "chat": {"id": int(chat_id) if chat_id.lstrip("-").isdigit() else 0},
                    "date": 1_700_000_000,
                    "text": text,
                },
            },
        )


def _error(code: int, description: str, parameters: dict[str, int] | None = None) -> Reply:
    body: dict[str, object] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return Reply.json(code, body)

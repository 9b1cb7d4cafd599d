"""The tutorial's index and room pages, and the nickname form's token."""

import time

from django.conf import settings
from django.http import Http404, HttpResponseBadRequest, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from . import tokens
from .protocol import ROOM_NAME, ROOM_NAME_RULE, is_text


def index(request):
    return render(request, "chat/index.html", {"identity": settings.CHAT_IDENTITY})


def room(request, room_name):
    if not ROOM_NAME.fullmatch(room_name):
        return HttpResponseBadRequest(f"Invalid room name: {ROOM_NAME_RULE}.\n", content_type="text/plain")
    return render(request, "chat/room.html", {"room_name": room_name, "identity": settings.CHAT_IDENTITY})


@require_POST
def nickname_token(request):
    """CHAT_IDENTITY=nickname: a token for the name in the form, valid in every room for CHAT_TOKEN_TTL.

    A nickname is claimed, not proven: the token only keeps anyone from posting under another name
    on a socket that was opened as someone else. Sites with logins mint tokens for their users.
    """
    if settings.CHAT_IDENTITY != "nickname":
        raise Http404("this chat does not sign nicknames")
    name = request.POST.get("name", "").strip()
    if not (0 < len(name) <= tokens.MAX_NAME_CHARS and is_text(name) and name.isprintable()):
        return JsonResponse(
            {"error": "bad_name", "detail": f"a name is 1-{tokens.MAX_NAME_CHARS} printable characters"}, status=400
        )
    token = tokens.mint(f"nickname:{name}", name)
    return JsonResponse({"token": token, "name": name, "expires_at": int(time.time()) + settings.CHAT_TOKEN_TTL})

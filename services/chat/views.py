"""The tutorial's index and room pages."""

from django.http import HttpResponseBadRequest
from django.shortcuts import render

from .protocol import ROOM_NAME, ROOM_NAME_RULE


def index(request):
    return render(request, "chat/index.html")


def room(request, room_name):
    if not ROOM_NAME.fullmatch(room_name):
        return HttpResponseBadRequest(f"Invalid room name: {ROOM_NAME_RULE}.\n", content_type="text/plain")
    return render(request, "chat/room.html", {"room_name": room_name})

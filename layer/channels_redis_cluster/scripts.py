"""The layer's Lua scripts, read from the package's ``lua/`` files, each opening with its KEYS/ARGV contract.

A line ``--! include lib/<name>`` stands for that fragment (included once per script), and every script
starts with the wire format's constants (``wire.LUA_CONSTANTS``), so the Lua and the Python read one
definition of the frame and entry layout.
"""

from importlib.resources import files

from . import wire
from .cluster import Script, ScriptCache

INCLUDE = "--! include "

# Every script made by ``load``: each pipeline puts them in its node's script cache as it connects, so no
# command of the layer meets NOSCRIPT. Loaded on the first NOSCRIPT instead, the first burst of a script
# each had one: a reconnect storm of 10,000 sockets on 2 workers drew 12,453 NOSCRIPT replies, and as many
# EVALs carrying the whole text, because every group_discard of the burst was sent before the first answer.
LOADED = ScriptCache()


def source(name):
    """The whole text of script ``name`` (``lua/<name>.lua``), its fragments and constants in place."""
    included = set()

    def expand(part):
        lines = []
        for line in files(__package__).joinpath("lua", f"{part}.lua").read_text().splitlines():
            if line.startswith(INCLUDE):
                fragment = line[len(INCLUDE) :].strip()
                if fragment not in included:
                    included.add(fragment)
                    lines.append(expand(fragment))
            else:
                lines.append(line)
        return "\n".join(lines)

    return wire.LUA_CONSTANTS + expand(name) + "\n"


def load(name):
    """Script ``name``, run by EVALSHA; kept in ``LOADED``."""
    script = Script(source(name))
    LOADED.scripts.append(script)
    return script

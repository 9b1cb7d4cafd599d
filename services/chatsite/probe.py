"""Container health probe: `python -m chatsite.probe [/path]` exits 0 when the local server answers 200."""

import http.client
import sys

from chatsite import environment as env


def main(path="/healthz"):
    """Ask this container's own server for `path`; the exit status is the verdict."""
    port = (env.text("OPS_BIND") or env.text("BIND")).rpartition(":")[2]
    connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=3)
    try:
        connection.request("GET", path, headers={"Host": "localhost"})
        status = connection.getresponse().status
    except OSError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{path}: HTTP {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""py-spy's view of a server process during a benchmark step: where its CPU went, by function and package."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

PROJECT = ("channels_redis_cluster/", "/chat/", "chatsite/")  # the frames an inclusive share is kept for


def profile(pid, seconds, out_dir):
    """py-spy's view of one worker: share of samples by leaf function and by package."""
    out = Path(out_dir) / f"profile-{pid}.txt"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--rate",
            "200",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not out.exists():
        return {"error": (result.stderr or result.stdout)[-300:]}
    return summarize_profile(out)


def summarize_profile(out):
    """Share of py-spy's raw samples by leaf function and by package (innermost project or library frame)."""
    leaves, packages, inclusive, total = Counter(), Counter(), Counter(), 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += count
        frames = stack.split(";")
        package = "other"
        for frame in reversed(frames):
            path = frame.split("(", 1)[-1]
            for name in (
                "channels_redis_cluster",
                "channels_redis",
                "channels/",
                "uvicorn",
                "wsproto",
                "websockets",
                "django",
                "redis/",
                "msgpack",
                "json",
                "asyncio",
                "uvloop",
                "chat/",
                "chatsite",
            ):
                if name in path:
                    package = name.strip("/")
                    break
            if package != "other":
                break
        packages[package] += count
        # Inclusive: the share of samples with this project function anywhere on the stack.
        for function in {frame.split(" (")[0] for frame in frames if any(part in frame for part in PROJECT)}:
            inclusive[function] += count

    def share(counter):
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(12)]

    return {"samples": total, "leaf_functions": share(leaves), "packages": share(packages), "inclusive": share(inclusive)}

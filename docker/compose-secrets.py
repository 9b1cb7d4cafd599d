"""The compose stack's Redis secrets, made once into DIRECTORY (the `secrets` volume) and kept across `up`s.

redis-password: REDIS_PASSWORD when given (it then replaces the kept one), otherwise 48 random hex digits.
ca.crt, tls.crt, tls.key: a CA of this stack's own and the nodes' certificate for HOSTS, for TLS between
the nodes and from chat; an EC P-256 key, valid ten years, for server and client use (the cluster bus).

    python compose-secrets.py DIRECTORY HOST [HOST ...]
"""

import datetime
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def write(path, data):
    """Replace ``path`` at once, readable by the nodes' and chat's users, which differ."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    new.chmod(0o444)
    new.replace(path)


def certificate(subject, key, issuer, issuer_key, ca, hosts=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def main(directory, *hosts):
    directory = Path(directory)
    password = os.environ.get("REDIS_PASSWORD")
    if password or not (directory / "redis-password").exists():
        write(directory / "redis-password", (password or secrets.token_hex(24)).encode())
    if (directory / "tls.crt").exists():
        return
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("chat-blueprint redis CA", ca_key, "chat-blueprint redis CA", ca_key, ca=True)
    node = certificate("redis", node_key, "chat-blueprint redis CA", ca_key, ca=False, hosts=(*hosts, "localhost"))
    write(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    write(
        directory / "tls.key",
        node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write(directory / "tls.crt", node.public_bytes(serialization.Encoding.PEM))  # last: its presence means done


if __name__ == "__main__":
    main(*sys.argv[1:])

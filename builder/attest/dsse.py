"""DSSE envelopes: signing the provenance Statement with a local ECDSA P-256 key, verifying it.

Signing is optional and local: an ECDSA P-256 key in a PEM file signs a DSSE envelope around
the provenance Statement. The SBOM's digest is a byproduct of the provenance, so one signature
covers both. Keys are read here and nowhere else; nothing of them reaches an image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from builder.attest.statement import MEDIA_INTOTO
from builder.errors import AttestationError, ConfigError

MEDIA_DSSE: Final = "application/vnd.dsse.envelope.v1+json"
#: Environment variable holding the signing key's password, when the PEM is encrypted.
KEY_PASSWORD_ENV: Final = "BUILDER_SIGN_KEY_PASSWORD"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_p256(key: Any, path: Path, what: str) -> None:
    public = key.public_key() if hasattr(key, "public_key") else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ConfigError(
            f"{path}: the {what} is not an ECDSA P-256 key",
            hint="generate one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`",
        )


def load_private_key(path: Path) -> Any:
    """An ECDSA P-256 private key from a PEM file (password from BUILDER_SIGN_KEY_PASSWORD)."""
    data = _read_pem(path, "signing key")
    password = os.environ.get(KEY_PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(
            data, password=password.encode() if password else None
        )
    except TypeError:
        raise ConfigError(
            f"{path}: the signing key is encrypted", hint=f"set {KEY_PASSWORD_ENV}"
        ) from None
    except ValueError:
        raise ConfigError(
            f"{path}: not a PEM private key (or the password is wrong)",
            hint="give the private key file; the public key is for verifying",
        ) from None
    _check_p256(key, path, "signing key")
    return key


def load_public_key(path: Path) -> Any:
    """An ECDSA P-256 public key from a PEM file (SubjectPublicKeyInfo, as cosign writes)."""
    data = _read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        hint = "that is a private key; give the public one" if b"PRIVATE KEY" in data else None
        raise ConfigError(f"{path}: not a PEM public key", hint=hint) from None
    _check_p256(key, path, "public key")
    return key


def key_id(public_key: Any) -> str:
    """A hint naming the key: sha256 of its DER SubjectPublicKeyInfo (never trusted as such)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sign_envelope(
    payload: bytes, key_path: Path, payload_type: str = MEDIA_INTOTO
) -> dict[str, Any]:
    """A DSSE envelope over ``payload``, signed with the ECDSA P-256 key at ``key_path``."""
    key = load_private_key(key_path)
    signature = key.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }


def envelope_payload(envelope: Mapping[str, Any], what: str = "DSSE envelope") -> bytes:
    """The payload of a DSSE envelope (not verified)."""
    try:
        return base64.b64decode(str(envelope["payload"]), validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise AttestationError(f"{what} is malformed: no base64 payload") from None


def verify_envelope(envelope: Mapping[str, Any], public_key_path: Path) -> bytes:
    """The payload of ``envelope`` if one of its signatures verifies with the key, else raise.

    Every signature is tried: ``keyid`` is only a hint and decides nothing.
    """
    key = load_public_key(public_key_path)
    payload = envelope_payload(envelope)
    payload_type = str(envelope.get("payloadType", ""))
    signatures = envelope.get("signatures") or []
    if not isinstance(signatures, list) or not signatures:
        raise AttestationError("the DSSE envelope has no signatures")
    message = pae(payload_type, payload)
    for entry in signatures:
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, AttributeError):
            continue
        return payload
    raise AttestationError(
        f"no signature of the DSSE envelope verifies with {public_key_path} "
        f"(key id {key_id(key)[:16]})",
        hint="wrong key, or the attestation was altered",
    )

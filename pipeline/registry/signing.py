"""Who may sign a registry decision: Ed25519 key pairs and the trust file.

Every promote / force / rollback / refusal (:mod:`pipeline.registry.audit`) is signed with the
deciding release manager's own Ed25519 private key; readers check it against the public keys
of a **trust file** (YAML, committed for the cluster as ``deploy/trust/release-managers.yaml``
and mounted into serving)::

    # who may sign registry decisions: NAME -> ed25519:<base64 of the 32-byte raw public key>
    version: 1
    signers:
      alice: ed25519:Vb3c...=

``NAME`` is who the decision names: the authenticated MLflow user on a server, ``$CESSL_USER``
(else the OS user) on a local store. The pipeline identity holds no key: what it writes to the
audit log is unsigned and never makes a champion.

Where things are found (the flag first, then the variable, then the local default under
``$CESSL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/cessl``, else ``~/.config/cessl``):

- the signing key: ``--signing-key`` / ``$CESSL_SIGNING_KEY`` / ``<config>/signing-key.pem``
  (PKCS#8 PEM, mode 0600; ``cessl access keygen`` writes it, never logs it);
- the trust file: ``--trust-file`` / ``$CESSL_TRUST_FILE`` / ``<config>/trust.yaml``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ml.errors import CesslError
from pipeline.core.files import UserFileError, YamlFile, read_yaml

log = logging.getLogger(__name__)

KEY_ENV = "CESSL_SIGNING_KEY"
TRUST_ENV = "CESSL_TRUST_FILE"
CONFIG_ENV = "CESSL_CONFIG_DIR"
KEY_FILE = "signing-key.pem"
PUBLIC_FILE = "signing-key.pub"
TRUST_FILE = "trust.yaml"
KEY_PREFIX = "ed25519:"
TRUST_VERSION = 1
TRUST_HEADER = (
    "# Who may sign CE-SSL registry decisions (promote, force, rollback, refusal).\n"
    "# NAME -> ed25519:<base64 of the 32-byte raw public key>; NAME is the MLflow user (or\n"
    "# $CESSL_USER on a local store). Add one with `cessl access keygen --name NAME --trust THIS_FILE`.\n"
)


class SigningError(CesslError):
    """No usable signing key or trust file (a missing, unreadable or exposed key; a bad entry)."""


def config_dir() -> Path:
    """``$CESSL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/cessl``, else ``~/.config/cessl``."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".config") / "cessl"


def default_trust_path() -> Path:
    return config_dir() / TRUST_FILE


# --------------------------------------------------------------------------- keys


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the raw 32 bytes>``, the trust file's form."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    """A public key in the trust file's form; SigningError naming ``where`` otherwise."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise SigningError(f"{where}: expected {KEY_PREFIX}<base64 public key>, got {str(text)[:40]!r}")
    try:
        raw = base64.b64decode(text.removeprefix(KEY_PREFIX), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as err:
        raise SigningError(f"{where}: not an Ed25519 public key ({err})") from None


@dataclass(frozen=True)
class Signer:
    """A decider's private key (never logged, never stored in an entry)."""

    key: Ed25519PrivateKey = field(repr=False)
    path: str = ""

    @property
    def public_text(self) -> str:
        return public_key_text(self.key.public_key())

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.key.sign(payload)).decode("ascii")


def load_signer(path: Path) -> Signer:
    """The private key at ``path``; refused when others may read it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise SigningError(f"signing key {path}: cannot read it ({err.strerror or err})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(f"signing key {path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(f"signing key {path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {path}: not an Ed25519 key (make one with `cessl access keygen`)")
    return Signer(key, str(path))


def has_signing_key() -> bool:
    """Whether :func:`find_signer` without a flag finds a key ($CESSL_SIGNING_KEY or the default file)."""
    return bool(os.environ.get(KEY_ENV, "").strip()) or (config_dir() / KEY_FILE).is_file()


KEYGEN_HINT = "cessl access keygen"  # once: the key that signs your promotions and rollbacks


def find_signer(flag: str = "") -> Signer:
    """The signing key of ``--signing-key``, ``$CESSL_SIGNING_KEY`` or ``<config>/signing-key.pem``."""
    explicit = flag or os.environ.get(KEY_ENV, "").strip()
    path = Path(explicit) if explicit else config_dir() / KEY_FILE
    if not explicit and not path.is_file():
        raise SigningError(
            f"no signing key: a registry decision is signed by its decider; give --signing-key FILE or set "
            f"${KEY_ENV} (none at {path}; make one with `cessl access keygen`)"
        )
    return load_signer(path)


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path
    public_text: str


def generate_key(out_dir: Path) -> KeyFiles:
    """A new key pair in ``out_dir``: ``signing-key.pem`` (mode 0600) and ``signing-key.pub``;
    never overwrites a key."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = out_dir / KEY_FILE, out_dir / PUBLIC_FILE
    if private.exists():
        raise SigningError(f"{private} exists: remove it first (or use --out DIR) - a key is never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    text = public_key_text(key.public_key())
    public.write_text(text + "\n", encoding="utf-8")
    return KeyFiles(private, public, text)


# --------------------------------------------------------------------------- the trust file


@dataclass(frozen=True)
class Trust:
    """The signers whose decisions count, from ``source`` (empty when it does not exist)."""

    signers: Mapping[str, Ed25519PublicKey]
    source: str
    exists: bool = True

    def check(self, who: str, payload: bytes, signature: str) -> str:
        """Why ``signature`` is not ``who``'s over ``payload`` ("" when it is)."""
        if not signature:
            return "unsigned"
        key = self.signers.get(who)
        if key is None:
            where = self.source if self.exists else f"{self.source} (missing)"
            return f"{who!r} is not a signer of the trust file {where}"
        try:
            key.verify(base64.b64decode(signature, validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            return f"signature is not {who!r}'s (trust file {self.source})"
        return ""

    def require(self, who: str, signer: Signer) -> None:
        """Before a decision: ``signer`` is ``who``'s key in this trust file (else nothing it
        signs would count)."""
        key = self.signers.get(who)
        if key is None or public_key_text(key) != signer.public_text:
            what = "has another key" if key is not None else "is not listed"
            raise SigningError(
                f"trust file {self.source}: {who!r} {what}; add {who}: {signer.public_text} (the public key of "
                f"{signer.path or 'your signing key'}) so that the decision can be verified"
            )


def _read_trust(path: Path) -> dict[str, str]:
    """NAME -> key text of the trust file at ``path``, read by :mod:`pipeline.core.files` (a
    regular file of at most 1 MiB, safe YAML); SigningError naming ``file:line`` otherwise."""
    try:
        doc = read_yaml(path)
        return _trust_entries(doc)
    except UserFileError as err:
        raise SigningError(f"trust file {err}") from None


def _trust_entries(doc: YamlFile) -> dict[str, str]:
    expected = f"expected 'version: {TRUST_VERSION}' and 'signers: {{NAME: KEY}}'"
    if doc.root is None:
        return {}
    if not isinstance(doc.root, yaml.MappingNode):
        raise SigningError(f"trust file {doc.at(doc.root)}: {expected}")
    top = {key: (key_node, value) for key, key_node, value in doc.pairs(doc.root)}
    for key, (key_node, _) in top.items():
        if key not in ("version", "signers"):
            raise SigningError(f"trust file {doc.at(key_node)}: unknown key {key!r}; {expected}")
    if "version" in top:
        version = doc.value(top["version"][1])
        if type(version) is not int or version != TRUST_VERSION:
            raise SigningError(f"trust file {doc.at(top['version'][1])}: {expected}")
    signers = top["signers"][1] if "signers" in top else None
    if signers is None or doc.value(signers) is None:
        return {}
    if not isinstance(signers, yaml.MappingNode):
        raise SigningError(f"trust file {doc.at(signers)}: 'signers' must map NAME -> {KEY_PREFIX}<base64>")
    entries: dict[str, str] = {}
    for name, name_node, key_node in doc.pairs(signers):
        key = doc.value(key_node)
        if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
            raise SigningError(f"trust file {doc.at(name_node)}: signer name {name!r}: non-empty text without ':'")
        parse_public_key(key, f"trust file {doc.at(key_node)}: {name}")
        entries[name] = key
    return entries


def load_trust(path: Path) -> Trust:
    """The trust file at ``path``; an empty :class:`Trust` when there is none."""
    if not path.exists():
        return Trust({}, str(path), exists=False)
    raw = _read_trust(path)
    return Trust({name: parse_public_key(key, f"trust file {path}: {name}") for name, key in raw.items()}, str(path))


def trust_path(flag: str = "") -> Path:
    """``--trust-file``, ``$CESSL_TRUST_FILE`` or ``<config>/trust.yaml``."""
    explicit = flag or os.environ.get(TRUST_ENV, "").strip()
    return Path(explicit) if explicit else default_trust_path()


def find_trust(flag: str = "") -> Trust:
    return load_trust(trust_path(flag))


def add_signer(path: Path, name: str, public_text: str) -> bool:
    """List ``name`` with ``public_text`` in the trust file at ``path`` (created if missing);
    False when it already is. Refuses to replace another key of ``name``."""
    if not name or name != name.strip() or ":" in name:
        raise SigningError(f"signer name {name!r}: must be non-empty, without ':' or surrounding spaces")
    parse_public_key(public_text, "the new public key")
    signers = _read_trust(path) if path.exists() else {}
    if signers.get(name) == public_text:
        return False
    if name in signers:
        raise SigningError(f"trust file {path} already lists {name!r} with another key: edit the file to replace it")
    signers[name] = public_text
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({"version": TRUST_VERSION, "signers": signers}, sort_keys=False)
    path.write_text(TRUST_HEADER + body, encoding="utf-8")
    return True

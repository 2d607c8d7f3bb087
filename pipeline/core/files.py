"""The one reader of the files a user hands in: ``sites.yaml``, a ``--params`` file, the
signing trust file, a ``--passwords`` file, a ``--kfp-token-file``.

A file is read only when it is safe to, and every problem is one line, ``FILE[:LINE]: problem``
(:class:`UserFileError`; :class:`MissingFileError` for a file that is not there):

- **regular files only**: a FIFO, a device (``/dev/zero``), a socket or a folder is refused
  before anything is read (the file is opened non-blocking: a FIFO never blocks the reader);
- **at most** :data:`MAX_FILE_BYTES` (1 MiB): a bigger file is refused from its size, and a
  file that grows while it is read stops at the limit;
- **UTF-8 text**: a binary file is refused, naming the line of its first bad byte;
- **YAML** (:func:`read_yaml`, :func:`parse_yaml`): PyYAML's safe loader on standard YAML 1.1,
  merge keys (``<<: *base``) included; any other tag (``!!python/object``, ``!custom``,
  ``!!binary``) is refused, as are nesting deeper than :data:`MAX_DEPTH`, more than
  :data:`MAX_NODES` values once aliases are expanded (an alias bomb is refused while it is
  composed, never expanded), a recursive alias, a key given twice and a NUL character in any
  text. Each node keeps its line (``YamlFile.at``) so a caller names the line of a bad value.

What the values mean is the caller's to check, with the constraints the same value has as a
flag (:mod:`pipeline.core.constraints`).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ml.errors import EXIT_USAGE, BadFileError

MAX_FILE_BYTES = 1024 * 1024  # every file a user hands in is a few flags, sites or keys
MAX_DEPTH = 32  # mappings and lists inside each other
MAX_NODES = 10_000  # values, aliases expanded
YAML_TAG = "tag:yaml.org,2002:"
MERGE_TAG = YAML_TAG + "merge"
# the tags of plain YAML values (what the files are made of); anything else is refused
PLAIN_TAGS = frozenset(YAML_TAG + name for name in ("null", "bool", "int", "float", "str", "seq", "map", "timestamp"))
_CHUNK = 64 * 1024


class UserFileError(BadFileError):
    """A file a user handed in that cannot be used: ``FILE[:LINE]: problem`` (exit 4)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class MissingFileError(UserFileError):
    """The file is not there (exit 2: a usage error, like a missing flag's file)."""

    exit_code = EXIT_USAGE


# ------------------------------------------------------------------------------ bytes and text


def _size(n: int) -> str:
    mib, kib = n / (1024 * 1024), n / 1024
    text = f"{mib:.1f}".removesuffix(".0") + " MiB" if mib >= 1 else f"{kib:.1f}".removesuffix(".0") + " KiB"
    return text


def _not_regular(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a plain file")
    return f"{kind}, not a regular file"


def _open(path: str) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise MissingFileError(path, "no such file") from None
    except IsADirectoryError:
        raise UserFileError(path, _not_regular(stat.S_IFDIR)) from None
    except OSError as err:
        raise UserFileError(path, f"cannot be read ({err.strerror or err})") from None


def read_bytes(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The content of the regular file ``path``, at most ``limit`` bytes (see the module's doc)."""
    where = str(path)
    fd = _open(where)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserFileError(where, _not_regular(info.st_mode))
        if info.st_size > limit:
            raise UserFileError(where, f"larger than {_size(limit)} ({_size(info.st_size)}): not a file this reads")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise UserFileError(where, f"cannot be read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise UserFileError(where, f"larger than {_size(limit)}: not a file this reads")
    return b"".join(chunks)


def decode_text(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); a binary file is refused."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserFileError(f"{where}:{line}", f"not UTF-8 text (byte {err.start}; a binary file?)") from None


def read_text(path: str | Path, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``limit`` bytes)."""
    return decode_text(read_bytes(path, limit), str(path))


def read_stdin_text(limit: int = MAX_FILE_BYTES) -> str:
    """Standard input as UTF-8 text, at most ``limit`` bytes (``-`` for a file)."""
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(limit + 1) if stream is not None else sys.stdin.read(limit + 1).encode("utf-8")
    if len(data) > limit:
        raise UserFileError("stdin", f"larger than {_size(limit)}")
    return decode_text(data, "stdin")


# ------------------------------------------------------------------------------ YAML


def line_of(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(YAML_TAG) if tag.startswith(YAML_TAG) else tag


def _key_id(node: yaml.Node) -> tuple[str, str]:
    return node.tag, str(node.value)


class _Composer(yaml.SafeLoader):
    """PyYAML's safe loader composing the node tree with the limits of the module's doc:
    each node is checked when it is complete, so a bad file stops where it goes wrong."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.depth = 0
        self.count = 0  # nodes composed
        self.sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def refuse(self, mark: Any, problem: str) -> UserFileError:
        return UserFileError(f"{self.where}:{int(mark.line) + 1}", problem)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self.sizes:
                raise self.refuse(event.start_mark, f"alias *{event.anchor} refers to itself (a recursive structure)")
            return super().compose_node(parent, index)
        self.count += 1
        if self.count > MAX_NODES:  # before the collection that holds them all ends
            raise self.refuse(self.peek_event().start_mark, f"more than {MAX_NODES} values")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.refuse(self.peek_event().start_mark, f"nested deeper than {MAX_DEPTH} levels")
        node = super().compose_node(parent, index)
        self.depth -= 1
        self.check(node)
        return node

    def check(self, node: yaml.Node) -> None:
        if node.tag not in PLAIN_TAGS and node.tag != MERGE_TAG:
            raise self.refuse(node.start_mark, f"tag {_tag_name(node.tag)} is not accepted (plain YAML values only)")
        children: list[yaml.Node] = []
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in node.value:
                raise self.refuse(node.start_mark, "a NUL character (\\0) in the text")
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            node.value = self.merged(node)
            children = [child for pair in node.value for child in pair]
        stray = next((child for child in children if child.tag == MERGE_TAG), None)
        if stray is not None:
            raise self.refuse(stray.start_mark, "'<<' is a merge key: quote it for the text '<<'")
        size = 1 + sum(self.sizes[id(child)] for child in children)
        if size > MAX_NODES:
            raise self.refuse(node.start_mark, f"more than {MAX_NODES} values once its aliases are expanded")
        self.sizes[id(node)] = size

    def merged(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        """The mapping's pairs with its merge keys (``<<``) applied: its own keys win, then
        the merged mappings in the order given; a key given twice is refused."""
        own: list[tuple[yaml.Node, yaml.Node]] = []
        sources: list[list[tuple[yaml.Node, yaml.Node]]] = []
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if key.tag == MERGE_TAG:
                sources += self.merge_sources(value)
                continue
            if not isinstance(key, yaml.ScalarNode):
                raise self.refuse(key.start_mark, "a key must be a plain value, not a list or a mapping")
            if _key_id(key) in first:
                raise self.refuse(
                    key.start_mark, f"key {key.value!r} given twice (first on line {first[_key_id(key)]})"
                )
            first[_key_id(key)] = line_of(key)
            own.append((key, value))
        if not sources:
            return own
        chosen: dict[tuple[str, str], tuple[yaml.Node, yaml.Node]] = {}
        for pairs in sources:
            for key, value in pairs:
                chosen.setdefault(_key_id(key), (key, value))
        for key, value in own:
            chosen[_key_id(key)] = (key, value)
        return list(chosen.values())

    def merge_sources(self, value: yaml.Node) -> list[list[tuple[yaml.Node, yaml.Node]]]:
        items = value.value if isinstance(value, yaml.SequenceNode) else [value]
        if not items or not all(isinstance(item, yaml.MappingNode) for item in items):
            raise self.refuse(value.start_mark, "'<<' merges a mapping or a list of mappings (e.g. '<<: *base')")
        return [list(item.value) for item in items]


def _yaml_problem(err: yaml.YAMLError, text: str, where: str) -> UserFileError:
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text[: err.position].count("\n") + 1
        return UserFileError(f"{where}:{line}", f"not valid YAML (character {chr(err.character)!r} is not allowed)")
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    at = f"{where}:{int(mark.line) + 1}" if mark is not None else where
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return UserFileError(at, f"not valid YAML ({problem})")


@dataclass(frozen=True)
class YamlFile:
    """A checked YAML document: its node tree (``root``: None for an empty file) and where it
    came from, for ``FILE:LINE`` messages."""

    path: str
    root: yaml.Node | None

    def at(self, node: yaml.Node) -> str:
        """``FILE:LINE`` of ``node``."""
        return f"{self.path}:{line_of(node)}"

    def error(self, node: yaml.Node, problem: str) -> UserFileError:
        return UserFileError(self.at(node), problem)

    def value(self, node: yaml.Node) -> Any:
        """The Python value of ``node`` (PyYAML's safe constructor; the node is checked)."""
        try:
            return yaml.SafeLoader("").construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as err:  # e.g. a date that does not exist
            raise self.error(node, f"not a valid YAML value ({str(err).splitlines()[0]})") from None

    def data(self) -> Any:
        """The whole document's value (None for an empty file)."""
        return None if self.root is None else self.value(self.root)

    def pairs(self, node: yaml.Node) -> list[tuple[Any, yaml.Node, yaml.Node]]:
        """``(key, key node, value node)`` of a mapping node, merge keys applied."""
        return [(self.value(key), key, value) for key, value in node.value]


def parse_yaml(text: str, where: str) -> YamlFile:
    """``text`` (the content of ``where``) as a checked YAML document."""
    try:
        composer = _Composer(text, where)
        try:
            root = composer.get_single_node()
        finally:
            composer.dispose()
    except yaml.YAMLError as err:
        raise _yaml_problem(err, text, where) from None
    return YamlFile(where, root)


def read_yaml(path: str | Path, limit: int = MAX_FILE_BYTES) -> YamlFile:
    """The regular file ``path`` read (:func:`read_text`) and parsed (:func:`parse_yaml`)."""
    return parse_yaml(read_text(path, limit), str(path))


def load_yaml(path: str | Path, limit: int = MAX_FILE_BYTES) -> Any:
    """The value of the YAML file ``path`` (None when empty), read and checked as above."""
    return read_yaml(path, limit).data()

"""Sample keys every reader of a shard agrees on, from any file name.

A key names a sample's tar members (`<key>.jpg`, `<key>.lbl`, ...), so it must survive every reader:
- webdataset and DALI's wds2idx split a member name at the first dot of its basename: no dots;
- DALI's index file is space-separated: no spaces (nor any other whitespace);
- a plain ustar header holds 100 bytes of name when there is no folder part: at most MAX_KEY_LEN characters,
  leaving room for the longest extension;
- a tar unpacked on a case-insensitive file system, or keys compared case-insensitively, must not merge two
  samples: no two keys of a dataset may be equal ignoring case.
So a name made only of ASCII letters, digits, `_` and `-`, short enough and unique ignoring case, is its own key
(`10_left`, as before). Any other name gets an ASCII slug (accents folded to ASCII, anything else -> `_`, cut to
length) plus `-` and a short hash of the file's path relative to the source root: deterministic, independent of
the other files except for case twins (`Case`, `case`: both hashed), and distinct for distinct files. A name that
happens to equal another's hashed key is caught by key_collisions.
The original name and file are kept in the sample's `.json` member ("name", "file"); patients are derived from the
original names by the sources, never from keys.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import defaultdict

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
MAX_KEY_LEN = 64  # + "." + extension stays far below ustar's 100-byte name field
HASH_LEN = 8


def slug(name: str) -> str:
    """ASCII letters, digits, `_` and `-` only (accents folded first), at most MAX_KEY_LEN characters."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9_-]", "_", folded)[:MAX_KEY_LEN] or "sample"


def path_hash(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_LEN]


def relative_file(path: str, root: str) -> str:
    """The file's path relative to the source root, with `/` separators (what the key hash and `.json` record)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def is_safe_key(key: str) -> bool:
    return bool(SAFE_KEY.fullmatch(key)) and len(key) <= MAX_KEY_LEN


def make_keys(names: list[str], files: list[str]) -> list[str]:
    """One key per (name, file relative to the source root), in order; distinct ignoring case when the files are.

    Equal names of distinct files (imagefolder's `a/b_c.png` and `a_b/c.png` are both `a_b_c`) are both hashed.
    A real duplicate (one name, two files of one folder) must be reported by the source before this point.
    """
    bases = [slug(name) for name in names]
    safe_folded: dict[str, int] = defaultdict(int)  # names usable as they are, by lower case
    for name, base in zip(names, bases):
        if base == name:
            safe_folded[name.lower()] += 1
    keys = []
    for name, file, base in zip(names, files, bases):
        if base == name and safe_folded[name.lower()] == 1:
            keys.append(base)
        else:
            keys.append(f"{base[:MAX_KEY_LEN - HASH_LEN - 1]}-{path_hash(file)}")
    return keys


def key_collisions(keys: list[str]) -> list[tuple[int, int]]:
    """(first, later) index pairs of keys equal ignoring case: a hash collision or a file literally named like
    another's hashed key. The sources report each as a problem naming both files."""
    first: dict[str, int] = {}
    pairs = []
    for i, key in enumerate(keys):
        j = first.setdefault(key.lower(), i)
        if j != i:
            pairs.append((j, i))
    return pairs

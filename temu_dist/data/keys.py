"""Image names as 8-byte keys (blake2b): what the packer's duplicate check and split and evaluation hold per sample,
so memory stays flat over AVA's 255k names where a dict of str would not. Its own module so that evaluation does not
import the label readers (openpyxl, scipy.io: 0.2 s at every start)."""
from __future__ import annotations

import hashlib


def name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)

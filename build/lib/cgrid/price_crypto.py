"""Encrypted clearing prices, the scheme of Google Authorized Buyers and BidSwitch.

For a buyer with keys, ``${AUCTION_PRICE}`` is not sent in clear but as

    value = web-safe base64, no padding, of  IV (16) ‖ price XOR pad (8) ‖ signature (4)

where price is the price in micros (price × 1,000,000, rounded) as an 8-byte big-endian
integer, pad = HMAC-SHA1(encryption key, IV)[:8] and signature = HMAC-SHA1(integrity key,
price ‖ IV)[:4]: 28 bytes, 38 characters. The IV is fresh for every call, the retry too.
Keys are given in web-safe base64 (as the exchange hands them to buyers) and checked at load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from cgrid.errors import CgridError

IV_BYTES = 16
PRICE_BYTES = 8
SIGNATURE_BYTES = 4
VALUE_BYTES = IV_BYTES + PRICE_BYTES + SIGNATURE_BYTES  # 28
VALUE_CHARS = 38
MICROS = Decimal(1_000_000)
MAX_MICROS = 2**63 - 1


class PriceCryptoError(CgridError, ValueError):
    """A key, a price or an encrypted value is not usable; the message says which and why."""


@dataclass(frozen=True)
class PriceKeys:
    encryption_key: bytes
    integrity_key: bytes

    @classmethod
    def from_web_safe(cls, encryption_key: str, integrity_key: str) -> PriceKeys:
        return cls(decode_key(encryption_key, "price_encryption_key"),
                   decode_key(integrity_key, "price_integrity_key"))


def _b64decode(text: str) -> bytes:
    """Web-safe base64, padding optional; any other character is an error."""
    text = text.strip().rstrip("=")
    if any(ch in text for ch in "+/"):
        raise ValueError("standard base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def decode_key(text: str, name: str) -> bytes:
    """A key in web-safe base64 (padding optional); at least 16 bytes."""
    if not isinstance(text, str) or not text.strip():
        raise PriceCryptoError(f"{name}: must be a non-empty web-safe base64 string")
    if any(ch in text for ch in "+/"):
        raise PriceCryptoError(f"{name}: is standard base64 ('+' or '/'); give it in web-safe base64 ('-', '_')")
    try:
        key = _b64decode(text)
    except (binascii.Error, ValueError):
        raise PriceCryptoError(f"{name}: is not valid web-safe base64") from None
    if len(key) < 16:
        raise PriceCryptoError(f"{name}: decodes to {len(key)} bytes; a key has at least 16 (usually 32)")
    return key


def price_micros(price: str | int | float) -> int:
    """The price in micros, rounded half up; refuses what is not a finite, non-negative number."""
    try:
        micros = (Decimal(str(price)) * MICROS).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    except (InvalidOperation, ValueError):
        # The value itself is left out: the reason is logged, and a price is never shown.
        raise PriceCryptoError("AUCTION_PRICE: is not a number, so it cannot be encrypted") from None
    if not micros.is_finite() or micros < 0 or micros > MAX_MICROS:
        raise PriceCryptoError("AUCTION_PRICE: is negative or too large to encrypt")
    return int(micros)


def encrypt_micros(micros: int, keys: PriceKeys, iv: bytes | None = None) -> str:
    """The encrypted value of a price in micros; a fresh random IV unless one is given."""
    iv = os.urandom(IV_BYTES) if iv is None else iv
    if len(iv) != IV_BYTES:
        raise PriceCryptoError(f"iv: must be {IV_BYTES} bytes")
    plain = micros.to_bytes(PRICE_BYTES, "big")
    pad = hmac.new(keys.encryption_key, iv, hashlib.sha1).digest()[:PRICE_BYTES]
    cipher = bytes(p ^ k for p, k in zip(plain, pad, strict=True))
    signature = hmac.new(keys.integrity_key, plain + iv, hashlib.sha1).digest()[:SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(iv + cipher + signature).rstrip(b"=").decode("ascii")


def encrypt_price(price: str | int | float, keys: PriceKeys) -> str:
    return encrypt_micros(price_micros(price), keys)


@dataclass(frozen=True)
class Decrypted:
    micros: int
    iv: bytes

    @property
    def price(self) -> Decimal:
        return Decimal(self.micros) / MICROS


def decrypt(value: str, keys: PriceKeys) -> Decrypted:
    """Decrypt and check the signature; raises :class:`PriceCryptoError` saying what is wrong."""
    try:
        raw = _b64decode(value)
    except (binascii.Error, ValueError):
        raise PriceCryptoError("value: is not valid web-safe base64") from None
    if len(raw) != VALUE_BYTES:
        raise PriceCryptoError(f"value: decodes to {len(raw)} bytes, not {VALUE_BYTES}")
    iv, cipher, signature = raw[:IV_BYTES], raw[IV_BYTES:IV_BYTES + PRICE_BYTES], raw[IV_BYTES + PRICE_BYTES:]
    pad = hmac.new(keys.encryption_key, iv, hashlib.sha1).digest()[:PRICE_BYTES]
    plain = bytes(c ^ k for c, k in zip(cipher, pad, strict=True))
    expected = hmac.new(keys.integrity_key, plain + iv, hashlib.sha1).digest()[:SIGNATURE_BYTES]
    if not hmac.compare_digest(signature, expected):
        raise PriceCryptoError("value: the signature does not match (wrong keys, or the value was altered)")
    return Decrypted(int.from_bytes(plain, "big"), iv)

"""Price encryption (Google Authorized Buyers / BidSwitch scheme) against the published
test vectors, and its refusals."""

from __future__ import annotations

import pytest

from cgrid.price_crypto import (
    VALUE_CHARS,
    PriceCryptoError,
    PriceKeys,
    decode_key,
    decrypt,
    encrypt_micros,
    encrypt_price,
    price_micros,
)

# Google's published sample keys and values (Authorized Buyers, "Decrypt price confirmations").
KEYS = PriceKeys.from_web_safe("skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=",
                               "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo=")
VECTORS = [("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw", 100),
           ("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA", 1900),
           ("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemC32prpWWw", 2700)]


@pytest.mark.parametrize(("value", "micros"), VECTORS)
def test_published_vectors_decrypt(value: str, micros: int) -> None:
    decrypted = decrypt(value, KEYS)
    assert decrypted.micros == micros and decrypted.iv == b"abc123def456ghi7"


@pytest.mark.parametrize(("value", "micros"), VECTORS)
def test_encrypting_with_the_vectors_iv_gives_the_published_value(value: str, micros: int) -> None:
    assert encrypt_micros(micros, KEYS, iv=b"abc123def456ghi7") == value


def test_every_value_has_a_fresh_iv_and_38_characters() -> None:
    values = {encrypt_price("1.25", KEYS) for _ in range(100)}
    assert len(values) == 100 and all(len(v) == VALUE_CHARS and "=" not in v for v in values)
    assert {decrypt(v, KEYS).micros for v in values} == {1_250_000}


@pytest.mark.parametrize(("price", "micros"), [("1.25", 1_250_000), (2, 2_000_000), (0.0000015, 2),
                                               ("0.0000014", 1), (1e-7, 0), ("12345.678901", 12_345_678_901)])
def test_price_in_micros_rounds_half_up(price: object, micros: int) -> None:
    assert price_micros(price) == micros  # type: ignore[arg-type]


@pytest.mark.parametrize("price", ["", "abc", "-1", "nan", "inf", "1e30"])
def test_bad_prices_are_refused_by_name(price: str) -> None:
    with pytest.raises(PriceCryptoError, match="AUCTION_PRICE"):
        price_micros(price)


def test_an_altered_value_or_wrong_keys_fail_the_signature() -> None:
    value, _ = VECTORS[0]
    altered = value[:20] + ("A" if value[20] != "A" else "B") + value[21:]
    with pytest.raises(PriceCryptoError, match="signature"):
        decrypt(altered, KEYS)
    other = PriceKeys(KEYS.encryption_key, KEYS.integrity_key[::-1])
    with pytest.raises(PriceCryptoError, match="signature"):
        decrypt(value, other)
    with pytest.raises(PriceCryptoError, match="bytes"):
        decrypt(value[:-4], KEYS)


@pytest.mark.parametrize(("text", "problem"), [("", "non-empty"), ("abc+/def", "standard base64"),
                                               ("YWJj", "bytes"), ("!!!!", "web-safe base64")])
def test_keys_are_checked_at_load(text: str, problem: str) -> None:
    with pytest.raises(PriceCryptoError, match=problem):
        decode_key(text, "price_encryption_key")

"""PII and secret detection. A request that carries any of these is neither looked up nor stored:
a cached answer could echo someone's card number to someone else.

Checksummed formats (cards: Luhn, IBAN: mod-97) are validated so that order numbers and
random digit strings do not trigger a bypass.
"""

from __future__ import annotations

import ipaddress
import re

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Card candidates: 13-19 digits with optional single spaces/dashes between groups.
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_UK_NI = re.compile(r"\b(?![DFIQUV])[A-Z](?![DFIQUVO])[A-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_PHONE = re.compile(
    r"\+\d{1,3}[ .-]?(?:\(?\d{1,4}\)?[ .-]?){1,4}\d{2,4}"  # international: +44 20 7946 0958
    r"|\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"  # North American: (555) 123-4567
    r"|\b0\d{2,4}[ .-]?\d{3,4}[ .-]?\d{3,4}\b"  # national trunk prefix: 07700 900123
)
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])|\b(?:[0-9A-Fa-f]{1,4}:)+:[0-9A-Fa-f:]*"
)
_SECRETS = re.compile(
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style keys
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bxox[baprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API key
    r"|-----BEGIN (?:RSA |EC |OPENSSH |)PRIVATE KEY-----"
    r"|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JWT
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _has_card(text: str) -> bool:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
            return True
    return False


def _has_iban(text: str) -> bool:
    return any(iban_ok(m.group()) for m in _IBAN.finditer(text))


def _has_ip(text: str) -> bool:
    for m in list(_IPV4.finditer(text)) + list(_IPV6.finditer(text)):
        try:
            ip = ipaddress.ip_address(m.group())
        except ValueError:
            continue
        # Version numbers like 1.2.3.4 parse as IPs too; loopback/unspecified addresses are not personal.
        if not (ip.is_loopback or ip.is_unspecified):
            return True
    return False


def _has_phone(text: str) -> bool:
    for m in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        # A phone is a whole digit run: a neighbouring digit group means a card/account number.
        before, after = text[max(0, m.start() - 2) : m.start()], text[m.end() : m.end() + 2]
        if re.search(r"\d[ .-]?$", before) or re.match(r"[ .-]?\d", after):
            continue
        if 9 <= len(digits) <= 15:
            return True
    return False


# Order matters: the first match names the bypass reason; cards before phones (a card looks like one).
_DETECTORS = (
    ("secret", lambda t: _SECRETS.search(t) is not None),
    ("email", lambda t: _EMAIL.search(t) is not None),
    ("card", _has_card),
    ("iban", _has_iban),
    ("ssn", lambda t: _SSN.search(t) is not None),
    ("uk_ni", lambda t: _UK_NI.search(t) is not None),
    ("ip", _has_ip),
    ("phone", _has_phone),
)


def find_pii(text: str) -> str | None:
    """Name of the first kind of PII/secret found in `text`, or None."""
    for name, detect in _DETECTORS:
        if detect(text):
            return name
    return None

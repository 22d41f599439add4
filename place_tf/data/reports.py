"""Radiology report parsing: FINDINGS / IMPRESSION sections of MIMIC-CXR free-text reports.

PLACE reads `schema.report_text(findings, impression)`, so the converter needs the two
sections, cleaned, from each raw report. Raw MIMIC-CXR reports look like

         FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___F with cough
     FINDINGS:
     The lungs are clear. ...
     IMPRESSION:
     1. No acute process.  2. ___ catheter tip in the SVC.

Rules (chosen to be predictable rather than clever):
- A section header is a known section name (any case, e.g. "Findings", "IMPRESSION") at
  the start of a line, followed by a colon or alone on its line; an UPPERCASE known name
  followed by a colon anywhere in a line ("... clear. IMPRESSION: normal"); or any other
  UPPERCASE phrase followed by a colon at the start of a line ("WET READ:"), which ends
  the previous section.
- "FINDINGS AND IMPRESSION" (also "FINDINGS/IMPRESSION", "IMPRESSION AND FINDINGS", ...)
  is one combined section: its text goes to `findings` (the impression stays whatever a
  separate IMPRESSION section says), so the joined report text never repeats itself.
  "CONCLUSION(S)" counts as IMPRESSION. A section that appears twice is concatenated.
- Text before the first header and in other sections (INDICATION, COMPARISON, ...) is
  dropped. A report without FINDINGS or IMPRESSION yields ("", "").
- De-identification blanks (`___`, any run of two or more underscores) are kept as the
  single neutral token "___": they mark removed PHI (names, dates, times), and keeping one
  spelling lets the tokenizer learn a single token for them instead of the real values.
- List numbering ("1. ", "2) ") at the start of a line or after a sentence end is removed,
  and a period is inserted where a numbered item lacked one, so "1. No effusion 2. Clear"
  becomes "No effusion. Clear". Decimals ("3.5 cm") are left alone.
- Whitespace (newlines, tabs, non-breaking spaces) collapses to single spaces; control
  characters are dropped.

`parse_report` never raises on any `str` (it is fuzzed); a non-str raises TypeError.
"""

from __future__ import annotations

import re

from place_tf.data import schema

__all__ = [
    "DEID_TOKEN",
    "REPORT_ORDERS",
    "join_sections",
    "normalize_section",
    "parse_report",
    "split_sentences",
]

DEID_TOKEN = "___"

# The order the model reads the two sections in: ours (FINDINGS then IMPRESSION), or
# MGCA's (HKU-MedAI/MGCA mgca/datasets/pretrain_dataset.py, create_path_2_sent_mapping:
# `captions = row["impression"] + " " + row["findings"]`).
REPORT_ORDERS = ("findings_impression", "impression_findings")

_FINDINGS = ("FINDINGS", "FINDING")
_IMPRESSION = ("IMPRESSIONS", "IMPRESSION", "CONCLUSIONS", "CONCLUSION")
_COMBINED = (
    "FINDINGS AND IMPRESSIONS",
    "FINDINGS AND IMPRESSION",
    "FINDINGS/IMPRESSIONS",
    "FINDINGS/IMPRESSION",
    "FINDINGS & IMPRESSIONS",
    "FINDINGS & IMPRESSION",
    "IMPRESSION AND FINDINGS",
    "IMPRESSIONS AND FINDINGS",
    "IMPRESSION/FINDINGS",
)
_OTHER = (
    "FINAL REPORT",
    "EXAMINATION",
    "TYPE OF EXAMINATION",
    "EXAM",
    "INDICATIONS",
    "INDICATION",
    "CLINICAL HISTORY",
    "CLINICAL INFORMATION",
    "CLINICAL INDICATION",
    "HISTORY",
    "REASON FOR EXAMINATION",
    "REASON FOR EXAM",
    "TECHNIQUE",
    "PROCEDURE",
    "COMPARISONS",
    "COMPARISON",
    "NOTIFICATION",
    "RECOMMENDATIONS",
    "RECOMMENDATION",
    "WET READ",
    "ADDENDUM",
)
_KIND: dict[str, str] = {}
for _n in _FINDINGS:
    _KIND[_n] = "findings"
for _n in _IMPRESSION:
    _KIND[_n] = "impression"
for _n in _COMBINED:
    _KIND[_n] = "combined"
for _n in _OTHER:
    _KIND[_n] = "other"


def _alternation(names) -> str:
    # Longest first so "FINDINGS AND IMPRESSION" wins over "FINDINGS"; spaces match any
    # run of blanks.
    parts = sorted(names, key=len, reverse=True)
    return "|".join(re.escape(p).replace(r"\ ", r"[ \t]+") for p in parts)


_KNOWN = _alternation(_KIND)
# Known name at line start, any case, then a colon or the end of the line.
_LINE_HEADER = re.compile(
    rf"^[ \t]*(?P<name>{_KNOWN})[ \t]*(?::|(?=\n)|\Z)", re.IGNORECASE | re.MULTILINE
)
# Known UPPERCASE name followed by a colon anywhere (not inside a word).
_INLINE_HEADER = re.compile(rf"(?<![A-Za-z0-9_])(?P<name>{_KNOWN})[ \t]*:")
# Any UPPERCASE phrase + colon at line start ("WET READ:", "PROVISIONAL FINDINGS ...:").
_OTHER_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z ()/&,\-]{2,60}?)[ \t]*:", re.MULTILINE)

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # not \t \n \v \f \r: whitespace
_BLANKS = re.compile(r"_{2,}")
# A list item number: 1-2 digits, "." or ")", whitespace, then something that starts a word
# (not a digit, so "3. 5 cm" and "2.5" stay); preceded by start, whitespace or punctuation.
_ITEM = re.compile(r"(?<![^\s.;:!?])(?P<num>\d{1,2})[.)][ \t]+(?=[^\d\s])")
_END_PUNCT = ".;:!?"
_SPACES = re.compile(r"\s+")


def _kind(name: str) -> str:
    key = _SPACES.sub(" ", name.strip().upper())
    return _KIND.get(key, "other")


def _headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each header, non-overlapping, in text order."""
    found = []
    for rx in (_LINE_HEADER, _INLINE_HEADER, _OTHER_HEADER):
        for m in rx.finditer(text):
            found.append((m.start(), m.end(), _kind(m.group("name"))))
    # Earliest start first; at the same start the longest match.
    found.sort(key=lambda h: (h[0], -(h[1] - h[0])))
    out: list[tuple[int, int, str]] = []
    last_end = -1
    for start, end, kind in found:
        if start >= last_end:
            out.append((start, end, kind))
            last_end = end
    return out


def _strip_numbering(text: str) -> str:
    """Remove "1. ", "2. ", ... of a numbered list, adding a period where an item had none.

    A list starts with "1." at the start of a line or after sentence punctuation (so "rib 1.
    Clear" keeps its number); later items only need to continue the sequence, which is how
    "1. Foo 2. Bar" on one line is recognised while a lone "measuring 2. The" is not.
    """
    out: list[str] = []
    pos = 0
    expected = 0  # next item number of the current list (0: no list open)
    last = ""  # last non-blank character written so far
    for m in _ITEM.finditer(text):
        n = int(m.group("num"))
        j = m.start() - 1
        while j >= 0 and text[j] in " \t":
            j -= 1
        opens = n == 1 and (j < 0 or text[j] == "\n" or text[j] in _END_PUNCT)
        if not (opens or (expected and n == expected)):
            continue
        expected = n + 1
        chunk = text[pos : m.start()]
        if chunk.strip():
            last = chunk.rstrip()[-1]
        out.append(chunk.rstrip())
        out.append(". " if last and last not in _END_PUNCT else " ")
        if last:
            last = "." if last not in _END_PUNCT else last
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def normalize_section(text: str) -> str:
    """Clean one section: control chars, `___` blanks, list numbering, whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_section expects str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _BLANKS.sub(DEID_TOKEN, text)

    text = _strip_numbering(text)
    return _SPACES.sub(" ", text).strip()


def parse_report(text: str) -> tuple[str, str]:
    """Raw report text -> (findings, impression), each normalised ("" when absent)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_report expects str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = _headers(text)
    parts: dict[str, list[str]] = {"findings": [], "impression": [], "combined": []}
    for i, (_, end, kind) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        if kind in parts:
            body = normalize_section(text[end:stop])
            if body:
                parts[kind].append(body)
    findings = " ".join(parts["findings"] + parts["combined"])
    impression = " ".join(parts["impression"])
    return findings, impression


def join_sections(findings, impression, order: str = "findings_impression"):
    """The report text the model reads, the two sections joined in `order` (one of
    REPORT_ORDERS); str or tf.string inputs, as schema.report_text."""
    if order == "findings_impression":
        return schema.report_text(findings, impression)
    if order == "impression_findings":
        return schema.report_text(impression, findings)
    raise ValueError(f"report order must be one of {REPORT_ORDERS}, got {order!r}")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9_(\"'])")


def split_sentences(text: str) -> list[str]:
    """Split normalised report text into sentences (on . ! ? followed by a capital/digit).

    Decimals ("3.5 cm") are not split because no whitespace follows the period.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_sentences expects str, got {type(text).__name__}")
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]

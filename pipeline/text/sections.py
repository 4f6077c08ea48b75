"""Radiology report parsing in the MIMIC-CXR text layout.

Sections follow the MIT-LCP section parser convention: a header is upper case at the start of a line
(after the report's leading space) and ends with a colon. Aliases fold into canonical names.
"""
from __future__ import annotations

import re

# "\n HEADER: " with the leading space of every report line; the MIT-LCP parser's own pattern.
_HEADER = re.compile(r"\n ?([A-Z][A-Z ()/,&-]*[A-Z)]):\s")

# Canonical section names. CONCLUSION / FINDINGS AND IMPRESSION count as impression, as in the
# MIT-LCP section parser; headers not listed keep their lower-cased name.
ALIASES: dict[str, str] = {
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "IMPRESSION AND RECOMMENDATION": "impression",
    "SUMMARY": "impression",
    "FINDINGS": "findings",
    "FINDING": "findings",
    "REPORT": "findings",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "TECHNIQUE": "technique",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "WET READ": "wet_read",
    "ADDENDUM": "addendum",
    "NOTIFICATION": "notification",
    "RECOMMENDATION": "recommendation",
    "RECOMMENDATIONS": "recommendation",
}


def _clean(text: str) -> str:
    return " ".join(text.split())


def extract_sections(text: str) -> dict[str, str]:
    """Split a report into ``{canonical section name: whitespace-normalised text}``.

    Text before the first header goes to ``"preamble"`` (e.g. "FINAL REPORT"). A section that
    appears twice is joined in order. Empty sections are kept with an empty string, so callers can
    tell "header present but empty" from "absent".
    """
    text = "\n" + text.replace("\r\n", "\n").replace("\r", "\n")
    parts = _HEADER.split(text)
    sections: dict[str, str] = {}
    preamble = _clean(parts[0])
    if preamble:
        sections["preamble"] = preamble
    for header, body in zip(parts[1::2], parts[2::2]):
        name = ALIASES.get(" ".join(header.split()), " ".join(header.lower().split()).replace(" ", "_"))
        body = _clean(body)
        if sections.get(name):
            sections[name] = f"{sections[name]} {body}".strip()
        else:
            sections[name] = body
    return sections


def join_sections(sections: dict[str, str], order: tuple[str, ...] = ("impression", "findings"),
                  separator: str = " ") -> tuple[str, list[str]]:
    """Join the non-empty sections named in ``order`` with ``separator``.

    Returns the text and the section names used. The original M-FLAG code joined impression and
    findings with no separator; a separator keeps sentences from running together.
    """
    used = [name for name in order if sections.get(name, "").strip()]
    return separator.join(sections[name] for name in used), used
